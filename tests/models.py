"""Real models for the tests: loaded once per backend and process."""

from functools import lru_cache

from fermi import backends, sources
from fermi.engine import Engine


@lru_cache(maxsize=None)
def engine(backend: str, spec: str = "smollm2-135m", dtype: str = "float32", quantize: int | None = None) -> Engine:
    model = sources.resolve(spec)
    return Engine(model, backends.get(backend).load(model, dtype=dtype, quantize=quantize))


def chat(eng: Engine, messages, thinking="auto", max_new_tokens=32, stop=None, core=None, **sampling) -> list:
    """The records of one reply, through a serving core (a fresh one-slot core unless given)."""
    core = core or eng.scheduler()
    return list(core.run(eng.request(messages, thinking, max_new_tokens, stop, **sampling)))


def greedy_text(eng: Engine, messages, max_new_tokens=32, **kw):
    recs = chat(eng, messages, max_new_tokens=max_new_tokens, temperature=0.0, **kw)
    return "".join(r.text for r in recs[:-1]), recs[-1]


# A prose passage for teacher-forced comparisons (a few hundred tokens).
TEXT = """The history of astronomy is a story of patient observation. Long before telescopes,
people watched the sky to keep track of the seasons, to plan harvests and to navigate across
open water. Babylonian scribes recorded the positions of the planets on clay tablets, and Greek
thinkers tried to explain those motions with nested spheres and circles. Ptolemy's model
predicted the positions of the planets well enough to be used for more than a thousand years.
In the sixteenth century Copernicus proposed that the Earth and the other planets move around
the Sun, which made the geometry simpler but did not at first make the predictions better.
Tycho Brahe then measured the planets with greater care than anyone before him, and Johannes
Kepler used those measurements to show that the orbits are ellipses rather than circles. Galileo
turned a small telescope to the sky and saw the moons of Jupiter, the phases of Venus and the
craters of the Moon. Newton finally explained why the planets move as they do: the same force
that makes an apple fall keeps the Moon in its orbit. Since then astronomers have learned that
the Sun is one star among hundreds of billions in our galaxy, that there are countless galaxies
beyond it, and that the universe has been expanding for almost fourteen billion years. Modern
observatories in deserts and on mountains, and telescopes in space, keep adding to this story
every year, and each new instrument shows something that nobody expected to find."""
