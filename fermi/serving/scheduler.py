"""The scheduler: many requests, one KV cache of N slots, one batched step.

One `step()`:
1. requests cancelled since the last step leave (their slots free now);
2. waiting requests are admitted, first come first served, into free slots
   (SlotStore.choose: the slot whose kept prefix they continue, else the least
   recently used one) and prefill only what the slot does not already hold;
3. prefill in chunks under a token budget per step, so requests already decoding
   keep streaming while a long prompt loads;
4. ONE batched decode over every decoding request (mixed positions and lengths);
5. ONE batched sampling call over the rows that need a token (the prompts whose
   prefill just ended, and the decodes), each row with its own parameters and
   token mask;
6. each request's output processor turns its token into records.

Requests join and leave between any two steps. A request whose own processing
fails fails alone; a fault in the shared decode fails the requests in that batch
(their slots start over), and the scheduler goes on.

It is not thread-safe but for `submit` and `Request.cancel`: one thread steps it
(the server's engine thread, or the CLI's own loop through `run`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Iterator

import numpy as np

from fermi.backends import empty_mask_rows
from fermi.errors import ContextOverflow, FermiError
from fermi.sampling import SamplingParams

from .output import Output
from .records import Delta, Done
from .request import QueueFull, Request
from .slots import SlotStore, common_prefix

log = logging.getLogger("fermi.serving")

PREFILL_BUDGET = 256  # prompt tokens prefilled per step, all requests together


class Scheduler:
    def __init__(self, engine, slots: int = 1, queue_max: int = 64, prefill_budget: int = PREFILL_BUDGET,
                 ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 max_tokens: int | None = None):
        """engine: what the core needs of a loaded model: runtime, tokenizer, eos_ids,
        context_length (fermi.engine.Engine, or a fake one in tests). max_tokens: the
        cap of a request that sets none (None: up to the context's end)."""
        if slots < 1:
            raise FermiError(f"the KV cache needs at least 1 slot, not {slots}")
        if queue_max < 0:
            raise FermiError(f"the queue limit must be >= 0, not {queue_max}")
        if prefill_budget < 1:
            raise FermiError(f"the prefill budget must be >= 1 token, not {prefill_budget}")
        self.engine, self.runtime = engine, engine.runtime
        self.max_tokens = max_tokens
        self.max_len = engine.context_length
        self.cache = self.runtime.new_cache(slots, self.max_len)
        self.slots = SlotStore(slots, ttl_s, clock)
        self.queue_max, self.prefill_budget = queue_max, prefill_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, in admission order (settles included)
        self.lock = threading.Condition()
        self.steps = 0
        self.wanted: set[int] = set()  # settling slots a waiting request waits for

    # --- any thread

    def submit(self, request: Request) -> Request:
        """Queue a request. Raises ContextOverflow (the prompt leaves no room),
        QueueFull (nothing queued), FermiError (bad values)."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request]) -> list[Request]:
        """Queue requests together (the choices of one prompt), all or none."""
        for request in requests:
            if not request.ids:
                raise FermiError("the prompt is empty")
            if len(request.ids) >= self.max_len:
                raise ContextOverflow(len(request.ids), self.max_len)
            if request.max_tokens is not None and request.max_tokens < 0:
                raise FermiError(f"max_tokens must be >= 0, not {request.max_tokens}")
            room = self.max_len - len(request.ids)
            cap = request.max_tokens if request.max_tokens is not None else self.max_tokens
            request.max_tokens = room if cap is None else min(cap, room)
            request.submitted = time.perf_counter()
        with self.lock:
            waiting = self.queued()
            # The slots the first waiting ones will take: free ones, and those settling (a step's work).
            free = sum(not s.busy for s in self.slots.slots) + sum(r.settle for r in self.running)
            if waiting + len(requests) > self.queue_max + free:
                raise QueueFull(max(waiting - free, 0))  # (those the free slots take at the next step start)
            self.waiting.extend(requests)
            self.lock.notify_all()
        return requests

    def queued(self) -> int:
        return sum(not r.cancelled for r in self.waiting)

    def active(self) -> int:
        return sum(not r.settle and not r.cancelled for r in self.running)

    @property
    def busy(self) -> bool:
        """Work to do: something waits or runs (or was cancelled and must be told)."""
        return bool(self.running or self.waiting)

    def cancel_waiting(self) -> None:
        """Cancel what has not started (a drain): told at the next step."""
        with self.lock:
            for r in self.waiting:
                r.cancel()
            self.lock.notify_all()

    def cancel_all(self) -> None:
        with self.lock:
            for r in list(self.waiting) + self.running:
                r.cancel()
            self.lock.notify_all()

    # --- the stepping thread

    def step(self) -> None:
        self.steps += 1
        self.reap()
        self._admit()
        rows, logits = [], []
        for r, lg in self._prefill():
            rows.append(r)
            logits.append(lg)
        decoding = [r for r in self.running if r.state == "decode"]
        if decoding:
            try:
                logits.append(self.runtime.decode([r.pending for r in decoding], self.cache,
                                                  [r.slot for r in decoding]))
                rows += decoding
            except Exception as e:  # noqa: BLE001 - the batch fails, the scheduler goes on
                log.exception("decode failed")
                for r in decoding:
                    self._fail(r, e)
        if rows:
            self._sample(rows, logits)

    def reap(self) -> None:
        """Cancelled requests leave now: waiting ones are told, running ones end with
        Done("cancelled") and free their slot."""
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            r.state = "done"
            self._send(r, self._done(r, "cancelled"))
        for r in [r for r in self.running if r.cancelled]:
            if r.settle:
                self._release(r)
            else:
                self._finish(r, "cancelled")

    def run(self, request: Request) -> Iterator[Delta | Done]:
        """Submit `request` and step until it is done, yielding its records as they
        come: the synchronous driver of the CLI (one thread, no engine thread). A
        consumer that stops early (Ctrl-C, close) cancels the request, which leaves
        its slot consistent."""
        out: deque = deque()
        request.sink = out.append
        self.submit(request)
        try:
            while True:
                while out:
                    item = out.popleft()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if isinstance(item, Done):
                        return
                self.step()
        finally:
            if not request.finished:
                request.cancel()
                request.sink = None
                self.reap()

    def reset(self) -> None:
        """Forget every kept prefix (no request may be running; settles are dropped)."""
        for r in [r for r in self.running if r.settle]:
            self._release(r)
        for s in self.slots.slots:
            s.ids = []
            self.cache.truncate(s.index, 0)

    # --- admission

    def _admit(self) -> None:
        settles = {x.slot: x for x in self.running if x.settle}
        self.wanted = set()
        while True:
            with self.lock:
                if not self.waiting:
                    return
                r = self.waiting[0]
                slot = self.slots.choose(r.ids, set(settles))
                if slot is None:  # first come, first served: the head waits for its slot...
                    # ...settled first, when the settle makes more of its prompt reusable...
                    self.wanted = {i for i, x in settles.items()
                                   if common_prefix(x.ids, r.ids) > common_prefix(self.slots[i].ids, r.ids)}
                    if self.wanted or not settles:
                        return
                    # ...or takes one whose settle has not run yet: a slot is worth more now.
                    shared = [i for i in settles if common_prefix(self.slots[i].ids, r.ids)] or list(settles)
                    self._release(settles.pop(shared[0]))
                    continue
                self.waiting.popleft()
            self._start(r, slot)

    def _start(self, r: Request, slot) -> None:
        self.slots.acquire(slot)
        r.slot, r.started = slot.index, time.perf_counter()
        # At least one prompt token is prefilled: its logits give the first token.
        r.cached = r.prefilled = min(common_prefix(slot.ids, r.ids), len(r.ids) - 1)
        self.cache.truncate(slot.index, r.cached)
        slot.ids = slot.ids[:r.cached]
        try:
            r.output = Output(self.engine.tokenizer, self.engine.eos_ids, r.max_tokens, r.stop, r.in_reasoning,
                              r.keep_reasoning, r.params.logprobs is not None,
                              r.tools.parser() if r.tools is not None else None, r.raw)
            r.sampler = self.runtime.sampler(r.params, r.ids)
        except Exception as e:  # noqa: BLE001 - this request fails alone
            self._fail(r, e)
            return
        leader = r.share
        # A choice of a prompt another request is prefilling waits for its cache rows.
        r.state = "fork" if leader is not None and leader.state == "prefill" else "prefill"
        self.running.append(r)
        if r.max_tokens == 0:
            self._finish(r, "length")

    # --- prefill, sampling, records

    def _prefill(self) -> list[tuple[Request, object]]:
        """Chunks of the prompts being prefilled, oldest first, under the budget.
        Returns the requests whose prompt is now in full, with the last position's logits."""
        ready, work, budget = [], [], self.prefill_budget
        for r in self.running:
            if r.state == "fork" and r.share.state != "prefill":
                r.state = "prefill"  # the leader ended (or failed) first: its own prefill
        # Settles run in time nothing else wants, unless a request waits for that slot
        # (then first): they only speed up a next turn that may never come.
        idle = not any(r.state in ("prefill", "decode") and not r.settle for r in self.running)
        for r in sorted((r for r in self.running if r.state == "prefill"), key=lambda r: r.slot not in self.wanted):
            if budget <= 0:
                break
            if r.settle and not idle and r.slot not in self.wanted:
                continue
            n = min(budget, len(r.ids) - r.prefilled)
            work.append((r, n))
            budget -= n
        for group in self._groups(work):
            try:
                logits = self._prefill_group(group)
            except Exception:  # noqa: BLE001 - then one at a time: only the one at fault fails
                logits = []
                for r, n in group:
                    try:
                        logits.append(self._prefill_group([(r, n)])[0])
                    except Exception as e:  # noqa: BLE001
                        if not isinstance(e, FermiError):
                            log.exception("prefill failed")
                        self._fail(r, e)
                        logits.append(None)
            for (r, n), lg in zip(group, logits):
                if r.state == "done":
                    continue
                r.prefilled += n
                if r.prefilled == len(r.ids):
                    if r.settle:
                        self._release(r)
                    else:
                        r.state = "sample"
                        ready.append((r, lg))
                        ready += self._forks(r, lg)
        return ready

    def _forks(self, leader: Request, logits) -> list[tuple[Request, object]]:
        """The choices waiting on `leader`'s prefill take a copy of its cache rows and
        sample from its last logits."""
        out = []
        for r in [r for r in self.running if r.state == "fork" and r.share is leader]:
            self.cache.copy(leader.slot, r.slot, len(r.ids))
            r.prefilled, r.state = len(r.ids), "sample"
            out.append((r, logits))
        return out

    def _groups(self, work: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
        """The chunks prefilled together in one forward: longest first, while the
        batch padded to its longest stays within twice the step's budget."""
        groups: list[list[tuple[Request, int]]] = []
        for r, n in sorted(work, key=lambda w: -w[1]):
            if groups and (len(groups[-1]) + 1) * groups[-1][0][1] <= 2 * self.prefill_budget:
                groups[-1].append((r, n))
            else:
                groups.append([(r, n)])
        return groups

    def _prefill_group(self, group: list[tuple[Request, int]]) -> list:
        chunks = [r.ids[r.prefilled:r.prefilled + n] for r, n in group]
        logits = self.runtime.prefill_batch(chunks, self.cache, [r.slot for r, _ in group])
        return [logits[i] for i in range(len(group))]

    def _sample(self, rows: list[Request], logits: list) -> None:
        masks = self._masks(rows)
        keep = [i for i, r in enumerate(rows) if r.state != "done"]  # a mask may have failed its request
        try:
            samples = self.runtime.sample(logits, [r.sampler for r in rows], masks)
        except Exception as e:  # noqa: BLE001
            log.exception("sampling failed")
            for i in keep:
                self._fail(rows[i], e)
            return
        now = time.perf_counter()
        for i in keep:
            r, sample = rows[i], samples[i]
            r.first_at = r.first_at or now
            try:
                for m in r.masks:
                    m.accept(sample.token)
                records, finish = r.output.feed(sample)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                log.exception("output processing failed")
                self._fail(r, e)
                continue
            for rec in records:
                self._send(r, rec)
            if finish is None and self.cache.lengths[r.slot] >= self.max_len:
                finish = "length"  # the context is full: no room to feed the token back
            if finish is not None or r.cancelled:
                self._finish(r, finish or "cancelled")
            else:
                r.pending, r.state = sample.token, "decode"

    def _masks(self, rows: list[Request]):
        """The batch's token bitmask [rows, words], or None when no row has a mask;
        a row whose masks allow nothing fails its request."""
        if not any(r.masks for r in rows):
            return None
        vocab = self.runtime.config.vocab_size
        words = -(-vocab // 32)
        masks = np.full((len(rows), words), -1, dtype=np.int32)
        for i, r in enumerate(rows):
            try:
                for m in r.masks:
                    row = np.full(words, -1, dtype=np.int32)
                    m.fill(row)
                    masks[i] &= row
                if r.masks and empty_mask_rows(masks[i:i + 1], vocab):
                    raise FermiError("the token mask allows no token: the constraint cannot be met")
            except Exception as e:  # noqa: BLE001 - this request fails alone
                self._fail(r, e)
                masks[i] = -1  # the row is sampled and dropped
        return masks

    def _send(self, r: Request, item) -> None:
        if r.sink is None:
            return
        try:
            r.sink(item)
        except Exception:  # noqa: BLE001 - a consumer gone (its loop closed): it leaves
            log.debug("a sink failed; cancelling its request", exc_info=True)
            r.sink = None
            r.cancel()

    def _done(self, r: Request, finish: str) -> Done:
        end = time.perf_counter()
        generated = r.output.generated if r.output else []
        first = r.first_at or end
        started = r.started or end
        n = len(generated)
        return Done(
            finish_reason=finish, prompt_tokens=len(r.ids), completion_tokens=n, cached_tokens=r.cached,
            ttft=first - r.submitted,
            decode_tps=(n - 1) / (end - first) if n > 1 and end > first else 0.0,
            prefill_tps=(len(r.ids) - r.cached) / (first - started) if first > started else 0.0,
            tokens=list(generated), logprobs=r.output.samples if r.output else [],
        )

    def _finish(self, r: Request, finish: str) -> None:
        """Flush its output, send Done, and hand its slot on (settled to the
        conversation's next turn when the request says how)."""
        try:
            records, finish = r.output.close(finish)
        except Exception as e:  # noqa: BLE001
            self._fail(r, e)
            return
        for rec in records:
            self._send(r, rec)
        self._send(r, self._done(r, finish))
        r.state = "done"
        nxt = None
        if finish != "cancelled" and r.next_turn is not None:
            try:
                nxt = r.next_turn(r.output.reply())
            except Exception:  # noqa: BLE001 - only the next request's speed is at stake
                log.exception("could not render the next turn")
        self._release(r)
        if nxt and len(nxt) < self.max_len:
            self._settle(self.slots[r.slot], nxt)

    def _settle(self, slot, ids: list[int]) -> None:
        """Bring a free slot's cache to `ids`: keep the common prefix, prefill the
        rest in the next steps (the slot is held meanwhile)."""
        keep = common_prefix(slot.ids, ids)
        if keep == len(ids) == len(slot.ids):
            return
        self.cache.truncate(slot.index, keep)
        slot.ids = slot.ids[:keep]
        if keep == len(ids):
            return
        s = Request(ids, SamplingParams(), 0)
        s.settle, s.state, s.slot, s.prefilled, s.cached = True, "prefill", slot.index, keep, keep
        self.slots.acquire(slot)
        self.running.append(s)

    def _release(self, r: Request) -> None:
        """The slot keeps what its cache holds: the truth may be a step more or less
        than what was sent."""
        if r in self.running:
            self.running.remove(r)
        r.state = "done"
        if r.slot is None:
            return
        held = self.cache.lengths[r.slot]
        generated = r.output.generated if r.output else []
        self.slots.release(self.slots[r.slot], (r.ids + generated)[:held])

    def _fail(self, r: Request, e: BaseException) -> None:
        """This request ends with `e` (its consumer gets the exception); its slot
        starts over, its cache no longer trusted."""
        if not isinstance(e, FermiError):
            e = FermiError(f"generation failed: {type(e).__name__}: {e}")
        if r in self.running:
            self.running.remove(r)
        r.state = "done"
        if r.slot is not None:
            self.cache.truncate(r.slot, 0)
            self.slots.release(self.slots[r.slot], [])
        self._send(r, e)
