"""The serving core's scheduler on a fake runtime (no weights, as nanochat tests
its engine with a mock model): admission order, chunked prefill beside decode,
joining and leaving mid-stream, cancellation, slot choice and LRU, the full
queue, settling, token masks, and a failing request that fails alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from fermi.backends import Sample
from fermi.errors import ContextOverflow, FermiError
from fermi.sampling import SamplingParams
from fermi.serving import Delta, Done, QueueFull, Request, Scheduler

VOCAB = 64
EOS = 0


def next_token(last: int) -> int:
    """The fake model: the next token depends only on the last one (never EOS)."""
    return 1 + (last * 7 + 3) % (VOCAB - 1)


class FakeCache:
    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.lengths = [0] * batch
        self.nbytes = 0

    def truncate(self, slot: int, n: int) -> None:
        self.lengths[slot] = max(0, min(n, self.lengths[slot]))


@dataclass
class Config:
    vocab_size: int = VOCAB


class FakeRuntime:
    device = "cpu"
    config = Config()

    def __init__(self):
        self.calls: list[tuple] = []

    def new_cache(self, batch, max_len):
        return FakeCache(batch, max_len)

    def prefill(self, ids, cache, slot=0):
        if cache.lengths[slot] + len(ids) > cache.max_len:
            raise ContextOverflow(cache.lengths[slot] + len(ids), cache.max_len)
        self.calls.append(("prefill", slot, len(ids)))
        cache.lengths[slot] += len(ids)
        return [ids[-1]]

    def prefill_batch(self, chunks, cache, slots):
        self.calls.append(("batch", len(chunks)))
        return [self.prefill(c, cache, s) for c, s in zip(chunks, slots)]

    def decode(self, tokens, cache, slots):
        self.calls.append(("decode", tuple(slots)))
        for s in slots:
            cache.lengths[s] += 1
        return list(tokens)

    def sampler(self, params, prompt_ids):
        return params

    def sample(self, logits, rows, masks=None):
        last = [t for lg in logits for t in lg]
        assert len(last) == len(rows)
        out = []
        for i, t in enumerate(last):
            token = next_token(t)
            if masks is not None:
                allowed = [j for j in range(VOCAB) if masks[i][j // 32] >> (j % 32) & 1]
                token = token if token in allowed else allowed[0]
            out.append(Sample(token))
        return out


class FakeTokenizer:
    def decode(self, ids, skip_special=False):
        return "".join(f"<{i}>" for i in ids)


class FakeEngine:
    def __init__(self, context_length=512):
        self.runtime = FakeRuntime()
        self.tokenizer = FakeTokenizer()
        self.eos_ids = {EOS}
        self.context_length = context_length


def core(slots=1, context_length=512, **kw) -> Scheduler:
    return Scheduler(FakeEngine(context_length), slots, **kw)


def req(ids, max_tokens=5, **kw) -> tuple[Request, list]:
    got: list = []
    r = Request(list(ids), SamplingParams(temperature=0), max_tokens, **kw)
    r.sink = got.append
    return r, got


def expected(ids, n) -> list[int]:
    out, last = [], ids[-1]
    for _ in range(n):
        last = next_token(last)
        out.append(last)
    return out


def run_all(s: Scheduler, limit=200) -> int:
    for n in range(limit):
        if not s.busy:
            return n
        s.step()
    raise AssertionError("the scheduler did not finish")


def done(got) -> Done:
    assert isinstance(got[-1], Done), got[-1]
    return got[-1]


def test_first_come_first_served_and_no_wait_while_a_slot_is_free():
    s = core(slots=2)
    (a, ga), (b, gb), (c, gc) = req([1, 2], 3), req([3, 4], 3), req([5, 6], 3)
    for r in (a, b, c):
        s.submit(r)
    s.step()
    assert (a.slot, b.slot, c.state) == (0, 1, "waiting")  # two slots: two admitted at once
    run_all(s)
    assert [done(g).tokens for g in (ga, gb, gc)] == [expected([1, 2], 3), expected([3, 4], 3), expected([5, 6], 3)]
    assert c.started >= max(a.started, b.started)


def test_batched_decode_gives_each_request_its_solo_output():
    prompts = [[i + 1] * (i + 2) for i in range(6)]
    solo = []
    for p in prompts:
        s = core()
        r, got = req(p, 4 + len(p) % 3)
        s.submit(r)
        run_all(s)
        solo.append(done(got).tokens)
    s = core(slots=4)
    gots = []
    for i, p in enumerate(prompts):  # admitted at different steps, finishing at different steps
        r, got = req(p, 4 + len(p) % 3)
        s.submit(r)
        gots.append(got)
        s.step()
    run_all(s)
    assert [done(g).tokens for g in gots] == solo
    assert max(len(c[1]) for c in s.runtime.calls if c[0] == "decode") == 4  # all slots in one decode


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding():
    s = core(slots=2, prefill_budget=64)
    a, ga = req([1, 2, 3], 50)
    s.submit(a)
    s.step()
    s.step()
    b, gb = req(list(range(1, 61)) * 4, 2)  # 240 tokens: 4 chunks of at most 64
    s.submit(b)
    before = sum(isinstance(x, Delta) for x in ga)
    steps = 0
    while b.state == "prefill" or b.state == "waiting":
        s.step()
        steps += 1
    assert steps == 4
    assert [c for c in s.runtime.calls if c[0] == "prefill" and c[1] == b.slot] == [("prefill", 1, 64)] * 3 + [
        ("prefill", 1, 48)]
    assert sum(isinstance(x, Delta) for x in ga) - before == steps  # a token a step all along
    run_all(s)
    assert done(gb).tokens == expected(b.ids, 2)


def test_join_and_leave_mid_stream():
    s = core(slots=2)
    a, ga = req([7], 5)
    b, gb = req([9], 6)
    s.submit(a)
    s.step()  # a prefilled and sampled
    s.step()  # a decodes alone
    s.submit(b)
    run_all(s)
    decodes = [c[1] for c in s.runtime.calls if c[0] == "decode"]
    assert decodes[0] == (0,) and (0, 1) in decodes and decodes[-1] == (1,)
    assert done(ga).tokens == expected([7], 5) and done(gb).tokens == expected([9], 6)


def test_cancel_frees_the_slot_within_one_step():
    s = core(slots=1)
    a, ga = req([1], 100)
    b, gb = req([2], 2)
    s.submit(a)
    s.submit(b)
    for _ in range(3):
        s.step()
    assert b.state == "waiting"
    a.cancel()
    s.step()
    assert done(ga).finish_reason == "cancelled" and b.slot == 0 and b.state != "waiting"
    assert s.cache.lengths[0] == len(b.ids) and s.slots[0].busy
    run_all(s)
    assert done(gb).tokens == expected([2], 2)


def test_cancelled_while_queued_is_told():
    s = core(slots=1)
    a, _ = req([1], 5)
    b, gb = req([2], 5)
    s.submit(a)
    s.submit(b)
    s.step()
    b.cancel()
    s.step()
    assert done(gb).finish_reason == "cancelled" and done(gb).completion_tokens == 0


def test_slot_choice_prefix_then_least_recently_used():
    s = core(slots=2)
    x, _ = req([1, 2, 3, 4, 5, 6, 7, 8], 2)
    y, _ = req([9, 9, 9, 9, 9, 9, 9, 9], 2)
    s.submit(x)
    s.submit(y)
    run_all(s)
    assert (x.slot, y.slot) == (0, 1)
    # The next turn of y's conversation goes to y's slot and prefills only what is new.
    cont, gc = req(y.ids + expected(y.ids, 1) + [5, 5], 1)
    s.submit(cont)
    run_all(s)
    assert cont.slot == 1 and done(gc).cached_tokens == len(y.ids) + 1
    # Something new takes the least recently used slot: x's.
    new, gn = req([3, 3, 3], 1)
    s.submit(new)
    run_all(s)
    assert new.slot == 0 and done(gn).cached_tokens == 0


def test_a_slot_mostly_reused_is_taken_over_the_least_recent():
    s = core(slots=2)
    doc = list(range(1, 41))
    x, _ = req(doc + [50], 1)
    y, _ = req([9] * 8, 1)
    s.submit(x)
    run_all(s)
    s.submit(y)
    run_all(s)
    other, g = req(doc + [60, 61], 1)  # the same document, another question: x's slot
    s.submit(other)
    run_all(s)
    assert other.slot == x.slot and done(g).cached_tokens == len(doc)


def test_full_queue_is_refused_at_once():
    s = core(slots=1, queue_max=1)
    s.submit(req([1], 5)[0])  # takes the free slot at the next step
    s.submit(req([2], 5)[0])  # waits
    with pytest.raises(QueueFull, match=r"\(1 waiting\)"):  # (not the one about to start)
        s.submit(req([3], 5)[0])
    s.step()
    with pytest.raises(QueueFull, match=r"\(1 waiting\)"):  # one running, one waiting: still full
        s.submit(req([3], 5)[0])


def test_bad_requests_are_refused_before_queueing():
    s = core(context_length=16)
    with pytest.raises(ContextOverflow):
        s.submit(req(list(range(1, 17)), 1)[0])
    with pytest.raises(FermiError):
        s.submit(req([], 1)[0])
    r, got = req([1] * 10, 100)  # max tokens cut to the context's end
    s.submit(r)
    run_all(s)
    assert done(got).finish_reason == "length" and done(got).completion_tokens == 6


def test_settle_prefills_the_next_turn_in_the_slot():
    s = core(slots=1)
    turn = [1, 2, 3]
    r, got = req(turn, 2, next_turn=lambda reply: turn + [40, 41, 42, 43])
    s.submit(r)
    run_all(s)
    assert done(got).tokens == expected(turn, 2)
    assert s.slots[0].ids == turn + [40, 41, 42, 43] and s.cache.lengths[0] == 7 and not s.slots[0].busy
    nxt, g2 = req(turn + [40, 41, 42, 43, 44, 45], 1)
    s.submit(nxt)
    run_all(s)
    assert done(g2).cached_tokens == 7


class AllowOnly:
    def __init__(self, tokens, fail_on=None):
        self.tokens, self.fail_on, self.seen = set(tokens), fail_on, []

    def fill(self, row):
        row[:] = 0
        for t in self.tokens:
            row[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def accept(self, token):
        if token == self.fail_on:
            raise ValueError("the grammar broke")
        self.seen.append(token)


def test_token_masks_are_applied_per_row():
    s = core(slots=2)
    mask = AllowOnly({5, 40})
    a, ga = req([1], 3, masks=[mask])
    b, gb = req([2], 3)
    s.submit(a)
    s.submit(b)
    run_all(s)
    assert set(done(ga).tokens) <= {5, 40} and mask.seen == done(ga).tokens
    assert done(gb).tokens == expected([2], 3)


def test_a_failing_request_fails_alone():
    s = core(slots=3)
    bad, gbad = req([1], 5, masks=[AllowOnly({33, 50}, fail_on=33)])
    empty, gempty = req([1], 5, masks=[AllowOnly(set())])
    good, ggood = req([2], 5)
    for r in (bad, empty, good):
        s.submit(r)
    run_all(s)
    assert isinstance(gbad[-1], FermiError) and isinstance(gempty[-1], FermiError)
    assert "allows no token" in str(gempty[-1])
    assert done(ggood).tokens == expected([2], 5)
    assert not any(sl.busy for sl in s.slots.slots)


def test_a_sink_that_fails_cancels_only_its_request():
    s = core(slots=2)
    a, _ = req([1], 50)

    def broken(item):
        raise RuntimeError("event loop closed")

    a.sink = broken
    b, gb = req([2], 5)
    s.submit(a)
    s.submit(b)
    run_all(s)
    assert a.cancelled and a.finished and done(gb).tokens == expected([2], 5)


def test_run_drives_one_request_and_a_stopped_consumer_cancels_it():
    s = core()
    r = Request([1, 2], SamplingParams(temperature=0), 20)
    recs = list(s.run(r))
    assert recs[-1].tokens == expected([1, 2], 20)
    r2 = Request([1, 2], SamplingParams(temperature=0), 20)
    gen = s.run(r2)
    next(gen)
    gen.close()
    assert r2.cancelled and r2.finished and not s.slots[0].busy
    assert s.slots[0].ids == (r2.ids + r2.output.generated)[:s.cache.lengths[0]]


def test_stop_strings_and_eos():
    s = core()
    r = Request([1], SamplingParams(temperature=0), 20, stop=[f"<{expected([1], 3)[2]}>"])
    recs = list(s.run(r))
    assert recs[-1].finish_reason == "stop" and recs[-1].completion_tokens == 3
    assert "".join(x.text for x in recs[:-1]) == "".join(f"<{t}>" for t in expected([1], 2))


def test_settles_wait_for_idle_time_and_give_way_to_new_requests():
    s = core(slots=2)
    a, _ = req([1, 2, 3], 2, next_turn=lambda reply: [1, 2, 3, 40, 41, 42])
    b, gb = req([9, 9], 30)
    s.submit(a)
    s.submit(b)
    for _ in range(4):
        s.step()
    # a is done; its settle waits while b decodes, holding a's slot
    settle = [r for r in s.running if r.settle]
    assert a.finished and len(settle) == 1 and settle[0].prefilled == 3 and s.slots[a.slot].busy
    c, gc = req([7, 7, 7], 2)  # needs a slot: the settle gives way
    s.submit(c)
    s.step()
    assert c.slot == a.slot and not any(r.settle for r in s.running)
    run_all(s)
    assert done(gc).tokens == expected([7, 7, 7], 2) and done(gb).tokens == expected([9, 9], 30)
    # With nothing else to do, a settle runs
    d, _ = req([5, 5], 1, next_turn=lambda reply: [5, 5, 60, 61])
    s.submit(d)
    run_all(s)
    assert s.slots[d.slot].ids == [5, 5, 60, 61]


def test_prompts_admitted_together_are_prefilled_in_one_forward():
    s = core(slots=4, prefill_budget=64)
    for p in ([1] * 10, [2] * 20, [3] * 5):
        s.submit(req(p, 1)[0])
    long, _ = req([4] * 100, 1)
    s.submit(long)
    s.step()  # budget 64: 10 + 20 + 5 and 29 of the long one, all in one forward (4 x 29 <= 2 x 64)
    assert [c for c in s.runtime.calls if c[0] == "batch"] == [("batch", 4)]
    assert long.prefilled == 29
    s = core(slots=3, prefill_budget=80)
    for p in ([1] * 60, [2] * 5, [3] * 5):
        s.submit(req(p, 1)[0])
    s.step()  # padded to 60, three rows would be 180 > 160: the last goes on its own
    assert [c for c in s.runtime.calls if c[0] == "batch"] == [("batch", 2), ("batch", 1)]


TURN = [1, 2, 3, 4]
NEXT = TURN + [40, 41, 42, 43]


def settling() -> tuple[Scheduler, Request]:
    """A core whose first request has finished and whose slot waits to settle to NEXT
    while another request decodes."""
    s = core(slots=2)
    a, _ = req(TURN, 3, next_turn=lambda reply: NEXT)
    s.submit(a)
    s.submit(req([9, 9], 40)[0])
    for _ in range(4):
        s.step()
    assert [r.ids for r in s.running if r.settle] == [NEXT]  # waits: the other one decodes
    return s, a


def test_a_request_waits_for_a_settle_only_when_the_settle_helps_it():
    s, a = settling()
    again, g = req(TURN, 2)  # a regeneration: the settle would not help it
    s.submit(again)
    s.step()
    assert again.slot == a.slot and not any(r.settle for r in s.running)
    run_all(s)
    assert done(g).cached_tokens == len(TURN) - 1
    s, a = settling()
    follow, g = req(NEXT + [50, 51], 1)  # the next turn: worth the wait
    s.submit(follow)
    s.step()  # the settle runs first, though another request decodes...
    assert follow.slot is None and not any(r.settle for r in s.running)
    s.step()  # ...and the next turn takes its slot
    assert follow.slot == a.slot and s.slots[a.slot].ids[:len(NEXT)] == NEXT
    run_all(s)
    assert done(g).cached_tokens == len(NEXT)


def test_a_request_that_sets_no_max_tokens_gets_the_cores_default_cap():
    s = core(max_tokens=4)
    r, got = req([1, 2, 3], max_tokens=None)
    given, g2 = req([1, 2, 3], max_tokens=7)
    s.submit(r)
    s.submit(given)
    run_all(s)
    assert done(got).completion_tokens == 4 and done(got).finish_reason == "length"
    assert done(g2).completion_tokens == 7  # a request's own value wins
    r, got = req([1, 2, 3], max_tokens=None)
    uncapped = core(context_length=20)
    uncapped.submit(r)
    run_all(uncapped)
    assert done(got).completion_tokens == 20 - 3  # no cap: up to the context's end
