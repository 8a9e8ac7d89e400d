"""Real models for the tests: loaded once per backend and process."""

from functools import lru_cache

from fermi import backends, sources
from fermi.engine import Engine


@lru_cache(maxsize=None)
def engine(backend: str, spec: str = "smollm2-135m", dtype: str = "float32") -> Engine:
    model = sources.resolve(spec)
    return Engine(model, backends.get(backend).load(model, dtype=dtype))


def greedy_text(eng: Engine, messages, max_new_tokens=32, **kw):
    recs = list(eng.session().chat(messages, "auto", max_new_tokens=max_new_tokens, temperature=0.0, **kw))
    return "".join(r.text for r in recs[:-1]), recs[-1]
