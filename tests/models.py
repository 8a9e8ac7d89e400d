"""Real models for the tests: loaded once per backend and process."""

from functools import lru_cache

from fermi import backends, sources
from fermi.engine import Engine


@lru_cache(maxsize=None)
def engine(backend: str, spec: str = "smollm2-135m", dtype: str = "float32", quantize: int | None = None,
           blocks: bool | None = None) -> Engine:
    model = sources.resolve(spec)
    return Engine(model, backends.get(backend).load(model, dtype=dtype, quantize=quantize, blocks=blocks))


def chat(eng: Engine, messages, thinking="auto", max_new_tokens=32, stop=None, core=None, **sampling) -> list:
    """The records of one reply, through a serving core (a fresh one-slot core unless given)."""
    core = core or eng.scheduler()
    return list(core.run(eng.request(messages, thinking, max_new_tokens, stop, **sampling)))


def greedy_text(eng: Engine, messages, max_new_tokens=32, **kw):
    recs = chat(eng, messages, max_new_tokens=max_new_tokens, temperature=0.0, **kw)
    return "".join(r.text for r in recs[:-1]), recs[-1]


from fermi.bench.workloads import PROSE as TEXT  # noqa: E402  (a prose passage for teacher-forced comparisons)
