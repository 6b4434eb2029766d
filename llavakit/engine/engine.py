"""Continuous batching: requests join and leave the running batch at every decode step.

Design (the parts that matter for a CPU server):

- ``SlotCache``: one KV buffer of ``slots x capacity`` positions per layer; the capacity
  doubles when a sequence needs it and never passes ``max_len``, so memory is bounded by
  ``slots x max_len`` and is usually far less. A request holds one slot from prefill to its
  last token. Running requests always occupy slots ``0..n-1`` (a finished slot is refilled by
  moving the last one into it), so a decode step reads plain slices, not gathers.
- Prefill runs one request at a time (batch 1, the same computation as ``Pipeline.chat``) and
  writes straight into its slot; decode steps run every running request together, each at its
  own position, with a per-row attention mask.
- Image-feature cache keyed by the preprocessed pixels' hash, and a prefix cache of finished
  conversations' KV keyed by (images, token ids): a follow-up turn about the same image copies
  the shared prefix and prefills only the new tokens.
- A bounded waiting queue (``EngineBusy`` when full), per-request sampling settings and seeds,
  cancellation that frees the slot at the next step, and counters for /metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from llavakit.engine.generate import (
    Detokenizer,
    GenerationConfig,
    accept_token,
    pick_tokens,
    process_logits,
)
from llavakit.errors import EngineBusy, EngineStopped, PromptTooLong
from llavakit.processing.processor import Encoded


class SlotCache:
    """Fixed KV buffers [slots, kv_heads, max_len, head_dim] per layer (duck-types Cache)."""

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        initial_len: int = 256,
    ) -> None:
        self.slots, self.max_len = slots, max_len
        self.capacity = min(initial_len, max_len)
        shape = (slots, kv_heads, self.capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(layers)]
        self._plan: tuple = ()

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions per slot: double the buffers (up to max_len)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the cache's {self.max_len}")
        new = self.capacity
        while new < length:
            new *= 2
        new = min(new, self.max_len)
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                grown = old.new_zeros(old.shape[0], old.shape[1], new, old.shape[3])
                grown[:, :, : self.capacity] = old
                buffers[i] = grown
        self.capacity = new

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def plan_prefill(self, slot: int, start: int, end: int) -> None:
        self.reserve(end)
        self._plan = ("prefill", slot, start)

    def plan_decode(self, positions: torch.Tensor) -> None:
        n = positions.shape[0]
        kv_len = int(positions.max()) + 1
        self.reserve(kv_len)
        self._plan = ("decode", torch.arange(n), positions, kv_len)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self._plan[0] == "prefill":
            _, slot, start = self._plan
            end = start + key.shape[2]
            k[slot, :, start:end] = key[0]
            v[slot, :, start:end] = value[0]
            return k[slot : slot + 1, :, :end], v[slot : slot + 1, :, :end]
        _, rows, positions, kv_len = self._plan
        k[rows, :, positions] = key[:, :, 0]
        v[rows, :, positions] = value[:, :, 0]
        n = rows.shape[0]
        return k[:n, :, :kv_len], v[:n, :, :kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # positions are always passed explicitly
        return 0

    def move(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def read(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (k[slot, :, :length].clone(), v[slot, :, :length].clone())
            for k, v in zip(self.k, self.v, strict=True)
        ]

    def write(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.reserve(length)
        for (k, v), (ck, cv) in zip(zip(self.k, self.v, strict=True), kv, strict=True):
            k[slot, :, :length] = ck[:, :length]
            v[slot, :, :length] = cv[:, :length]


class FeatureCache:
    """Image features by content key; past ``entries`` the least recently used are dropped."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, encode, *args: Any) -> tuple[Any, bool]:
        """(features, whether they were cached); ``encode(*args)`` computes them on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        value = self._items[key] = encode(*args)
        if len(self._items) > self.entries:
            self._items.popitem(last=False)
        return value, False

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Finish:
    """Last event of a request."""

    reason: str  # "stop" (EOS or stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: BaseException | None = None


class RequestHandle:
    """Events of one request: text deltas (str), then one ``Finish``. Iterate sync or async."""

    _ids = itertools.count()

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.id = next(self._ids)
        self.cancelled = threading.Event()
        self._loop = loop
        self._async_q: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._sync_q: queue.SimpleQueue = queue.SimpleQueue()
        self.finish: Finish | None = None

    def _push(self, event: str | Finish) -> None:
        if self._async_q is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_q.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancelled.set()
        else:
            self._sync_q.put(event)

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot at its next step."""
        self.cancelled.set()

    def _ended(self, event: str | Finish) -> bool:
        """True for the last event (recorded in ``finish``); its error, if any, is raised."""
        if not isinstance(event, Finish):
            return False
        self.finish = event
        if event.error is not None:
            raise event.error
        return True

    def __iter__(self) -> Iterator[str]:
        while not self._ended(event := self._sync_q.get()):
            yield event

    async def aiter(self) -> AsyncIterator[str]:
        assert self._async_q is not None, "submit with a loop to iterate asynchronously"
        try:
            while not self._ended(event := await self._async_q.get()):
                yield event
        finally:
            if self.finish is None:  # the consumer went away (client disconnected)
                self.cancel()

    def text(self) -> str:
        return "".join(self)


@dataclass
class _Request:
    handle: RequestHandle
    encoded: Encoded
    cfg: GenerationConfig
    image_keys: tuple[str, ...]
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Running:
    req: _Request
    ids: list[int]  # tokens whose keys/values are in the slot
    next_token: int  # sampled, not yet fed
    detok: Detokenizer
    generator: torch.Generator | None
    seen: torch.Tensor
    generated: int = 1
    cached: int = 0


@dataclass
class EngineStats:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    prefix_hits: int = 0
    prefix_tokens_reused: int = 0
    image_hits: int = 0
    image_misses: int = 0
    decode_steps: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (time, tokens)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span


class Engine:
    """Serve many generation requests from one model with continuous batching.

    ``engine = Engine(pipe, max_batch=16)``; ``handle = engine.submit(encoded, cfg)``; iterate
    the handle for text deltas. ``engine.close()`` stops the worker thread.
    """

    def __init__(
        self,
        pipe,
        max_batch: int = 16,
        max_queue: int = 64,
        max_len: int | None = None,
        prefix_cache_tokens: int = 16384,
        image_cache_entries: int = 128,
    ) -> None:
        self.pipe = pipe
        self.model = pipe.model
        self.max_len = min(max_len or self.model.config.max_context, self.model.config.max_context)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = self._new_cache()
        self.eos_ids = pipe.eos_token_ids()
        self.stats = EngineStats()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Running] = []
        self._cond = threading.Condition()
        self._closed = False
        self._features = FeatureCache(image_cache_entries)
        self._prefixes: OrderedDict[tuple, list] = OrderedDict()
        self._prefix_budget = prefix_cache_tokens
        self._prefix_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="llavakit-engine", daemon=True)
        self._thread.start()

    def _new_cache(self):
        """KV memory: slots x capacity, the capacity doubling on demand up to max_len."""
        lm_cfg = self.model.language_model.config
        kv_heads = getattr(lm_cfg, "num_key_value_heads", None) or lm_cfg.num_attention_heads
        head_dim = getattr(lm_cfg, "head_dim", None) or (
            lm_cfg.hidden_size // lm_cfg.num_attention_heads
        )
        return SlotCache(
            lm_cfg.num_hidden_layers,
            self.max_batch,
            kv_heads,
            head_dim,
            self.max_len,
            self.model.dtype,
        )

    # -- public --------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(
        self,
        encoded: Encoded,
        cfg: GenerationConfig,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue a request; raises ``EngineBusy`` when the queue is full."""
        if len(encoded.input_ids) >= self.max_len:
            raise PromptTooLong(len(encoded.input_ids), self.max_len)
        keys = tuple(
            _pixel_key(p, s) for p, s in zip(encoded.pixel_values, encoded.image_sizes, strict=True)
        )
        handle = RequestHandle(loop)
        with self._cond:
            if self._closed:
                raise EngineStopped("the engine is shut down")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise EngineBusy(
                    f"the queue is full ({self.max_queue} waiting requests); retry later"
                )
            self._waiting.append(_Request(handle, encoded, cfg, keys))
            self.stats.requests += 1
            self._cond.notify()
        return handle

    def generate(self, encoded: Encoded, cfg: GenerationConfig) -> str:
        return self.submit(encoded, cfg).text()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        for req in list(self._waiting):
            req.handle._push(Finish("error", 0, 0, error=EngineStopped("engine shut down")))
        self._waiting.clear()

    # -- worker thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    break
                admit = []
                while self._waiting and len(self._running) + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
            with torch.inference_mode():
                for req in admit:
                    self._start(req)
                self._drop_cancelled()
                if self._running:
                    self._decode_step()
        for run in self._running:
            run.req.handle._push(self._finish(run, "error", EngineStopped("engine shut down")))
        self._running.clear()

    def _finish(self, run: _Running, reason: str, error: BaseException | None = None) -> Finish:
        return Finish(reason, len(run.req.encoded.input_ids), run.generated, run.cached, error)

    def _image_features(self, req: _Request) -> torch.Tensor | None:
        if not req.encoded.pixel_values:
            return None
        return torch.cat(self._features_of(req))

    def _features_of(self, req: _Request) -> list:
        """Each image's features, from the feature cache or encoded now (counted in stats)."""
        enc, out = req.encoded, []
        for key, pixels, size in zip(
            req.image_keys, enc.pixel_values, enc.image_sizes, strict=True
        ):
            feats, hit = self._features.get(key, self._encode_image, pixels, size)
            if hit:
                self.stats.image_hits += 1
            else:
                self.stats.image_misses += 1
            out.append(feats)
        return out

    def _encode_image(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.model.encode_images([pixels], [size])

    def _lookup_prefix(self, req: _Request) -> tuple[int, list | None]:
        ids = req.encoded.input_ids
        best, best_kv, best_key = 0, None, None
        for key, kv in self._prefixes.items():
            images, cached_ids = key
            if images != req.image_keys:
                continue
            n = 0
            for a, b in zip(cached_ids, ids, strict=False):
                if a != b:
                    break
                n += 1
            n = min(n, len(ids) - 1)  # at least one token is prefilled to get the logits
            if n > best:
                best, best_kv, best_key = n, kv, key
        if best_key is not None:
            self._prefixes.move_to_end(best_key)
        return best, best_kv

    def _store_prefix(self, run: _Running, slot: int) -> None:
        length = len(run.ids)
        if length < 2 or length > self._prefix_budget:
            return
        key = (run.req.image_keys, tuple(run.ids))
        if key in self._prefixes:
            return
        self._prefixes[key] = self.cache.read(slot, length)
        self._prefix_tokens += length
        while self._prefix_tokens > self._prefix_budget:
            (_, old_ids), _ = self._prefixes.popitem(last=False)
            self._prefix_tokens -= len(old_ids)

    def _start(self, req: _Request) -> None:
        handle, enc, cfg = req.handle, req.encoded, req.cfg
        if handle.cancelled.is_set():
            self.stats.cancelled += 1
            handle._push(Finish("cancelled", len(enc.input_ids), 0))
            return
        try:
            reused, logits = self._prefill(req, len(self._running))
        except Exception as exc:  # a bad request must not take the engine down
            handle._push(Finish("error", len(enc.input_ids), 0, error=exc))
            return
        self.stats.prompt_tokens += len(enc.input_ids)
        generator = (
            torch.Generator(device="cpu").manual_seed(cfg.seed) if cfg.seed is not None else None
        )
        run = _Running(
            req=req,
            ids=list(enc.input_ids),
            next_token=0,
            detok=Detokenizer(self.pipe.tokenizer, cfg.stop),
            generator=generator,
            seen=torch.tensor(enc.input_ids, dtype=torch.long),
            generated=0,
            cached=reused,
        )
        self._running.append(run)
        self._accept(run, logits)

    def _prefill(self, req: _Request, slot: int) -> tuple[int, torch.Tensor]:
        """Fill ``slot`` with the prompt's keys / values (reusing a cached prefix); return the
        number of reused positions and the last position's [1, V] logits."""
        reused, kv = self._lookup_prefix(req)
        if reused:
            self.cache.write(slot, kv, reused)
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens_reused += reused
        ids = torch.tensor([req.encoded.input_ids], dtype=torch.long)
        embeds = self._embed(req, ids, reused)
        total = ids.shape[1]
        self.cache.plan_prefill(slot, reused, total)
        positions = torch.arange(reused, total)[None]
        mask = self._additive(torch.ones(1, 1, total - reused, total).tril(reused).bool())
        out = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return reused, out.logits[:, -1].float()

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean [B, 1, q, kv] mask -> additive float mask (works for sdpa and eager)."""
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def _embed(self, req: _Request, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings of ids[:, start:]; images are encoded only if their tokens are there."""
        mask = ids == self.model.config.image_token_id
        table = self.model.language_model.get_input_embeddings()
        if not mask[:, start:].any():  # the cached prefix covers every image: no tower
            return table(ids[:, start:])
        embeds = table(ids.masked_fill(mask, 0))
        features = self._image_features(req)
        if features is not None:
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds[:, start:]

    def _accept(self, run: _Running, logits: torch.Tensor) -> None:
        """Sample the next token of ``run`` from its [1, V] logits; emit text; maybe finish."""
        cfg = run.req.cfg
        token = int(pick_tokens(process_logits(logits, [run.seen], cfg), cfg, run.generator)[0])
        budget = min(cfg.max_new_tokens, self.max_len - len(run.req.encoded.input_ids))
        reason = None
        if budget <= 0:
            reason = "length"
        else:
            run.generated += 1
            delta, end = accept_token(token, run.detok, cfg, self.eos_ids)
            if end is not None:
                reason = "stop"
            elif run.generated >= budget or len(run.ids) + 1 >= self.max_len:
                reason = "length"
                delta += run.detok.flush()
            if end != "eos":
                run.seen = torch.cat([run.seen, torch.tensor([token])])
            if delta:
                run.req.handle._push(delta)
        if budget > 0:
            self.stats.generated_tokens += 1
            self.stats.recent.append((time.monotonic(), 1))
        run.next_token = token
        if reason is not None:
            self._release(run, reason)

    def _release(self, run: _Running, reason: str) -> None:
        slot = self._running.index(run)
        if reason in ("stop", "length"):
            self._store_prefix(run, slot)
            self.stats.finished += 1
        else:
            self.stats.cancelled += 1
        last = len(self._running) - 1
        if slot != last:
            self.cache.move(last, slot, len(self._running[last].ids))
            self._running[slot] = self._running[last]
        self._running.pop()
        run.req.handle._push(self._finish(run, reason))

    def _drop_cancelled(self) -> None:
        for run in [r for r in self._running if r.req.handle.cancelled.is_set()]:
            self._release(run, "cancelled")

    def _decode_step(self) -> None:
        runs = list(self._running)
        try:
            logits = self._forward_step(runs)
        except Exception as exc:
            for run in runs:
                self._running.remove(run)
                run.req.handle._push(self._finish(run, "error", exc))
            return
        self.stats.decode_steps += 1
        for run in runs:
            run.ids.append(run.next_token)
        for row, run in enumerate(runs):
            self._accept(run, logits[row : row + 1])

    def _forward_step(self, runs: list[_Running]) -> torch.Tensor:
        """Feed every running request its next token (each at its own position): [B, V]."""
        tokens = torch.tensor([[r.next_token] for r in runs], dtype=torch.long)
        positions = torch.tensor([len(r.ids) for r in runs], dtype=torch.long)
        self.cache.plan_decode(positions)
        kv_len = int(positions.max()) + 1
        mask = self._additive((torch.arange(kv_len)[None, :] <= positions[:, None])[:, None, None])
        out = self.model.language_model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()


def _pixel_key(pixels: torch.Tensor, size: tuple[int, int]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(pixels.shape), str(pixels.dtype), tuple(size))).encode())
    h.update(pixels.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sampling(**kwargs: Any) -> GenerationConfig:
    """A GenerationConfig from keyword arguments (a convenience for callers)."""
    return GenerationConfig(**kwargs)
