"""The language model in llama.cpp (GGUF f16 / q8_0), the vision side in llavakit.

llama.cpp decodes several times faster than PyTorch on a CPU; llavakit encodes images faster
than llama.cpp's own CLIP path and keeps the model's exact template and image placement. So
``GGUFPipeline`` runs the vision tower and projector in PyTorch and hands their features to
llama.cpp as input embeddings at the image positions (text positions go in as token ids).

- ``convert_lm``: the model's LM written as GGUF by llama.cpp's own ``convert_hf_to_gguf.py``
  (from the llama-cpp-python source archive, fetched once into the cache), written to a temp
  file and renamed; ``gguf_for`` caches one conversion per checkpoint and type.
- ``GGUFPipeline.chat`` / ``stream``: the same arguments, template, stop strings and
  sampling as ``Pipeline``; batch 1. An image-feature cache and a prefix cache: a follow-up
  turn about the same image keeps llama.cpp's KV for the shared prefix and evaluates only
  the new tokens.

Needs llama-cpp-python (``make llamacpp`` builds it from source).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llavakit.engine.engine import Engine, FeatureCache, _pixel_key
from llavakit.engine.generate import (
    Detokenizer,
    accept_token,
    pick_tokens,
    process_logits,
)
from llavakit.errors import FeatureCountMismatch, LlavakitError, PromptTooLong
from llavakit.pipeline import Pipeline

OUTTYPES = ("f16", "q8_0")


class GGUFUnavailable(LlavakitError):
    """llama-cpp-python or llama.cpp's converter is not available here."""


def _cache_root() -> Path:
    from llavakit.demo import cache_dir

    return cache_dir()


def find_converter() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` (the llama-cpp-python sdist, fetched once)."""
    src = _cache_root() / "llama-cpp-src"
    hits = sorted(src.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if hits:
        return hits[-1]
    src.mkdir(parents=True, exist_ok=True)
    try:
        import llama_cpp

        spec = f"llama-cpp-python=={llama_cpp.__version__}"
    except ImportError:
        spec = "llama-cpp-python"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    try:
        subprocess.run([*cmd, spec, "-d", str(src)], check=True, capture_output=True)
        archive = sorted(src.glob("llama_cpp_python-*.tar.gz"))[-1]
        subprocess.run(["tar", "xzf", str(archive), "-C", str(src)], check=True)
    except (subprocess.CalledProcessError, IndexError, OSError) as exc:
        raise GGUFUnavailable(
            f"could not fetch llama.cpp's GGUF converter ({spec} source archive): {exc}"
        ) from exc
    hits = sorted(src.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not hits:
        raise GGUFUnavailable(f"{spec} source archive has no convert_hf_to_gguf.py")
    return hits[-1]


def convert_lm(language_model, tokenizer, out: str | os.PathLike, outtype: str = "q8_0") -> Path:
    """Write ``language_model`` (a transformers causal LM) and its tokenizer as one GGUF file."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    out = Path(out)
    converter = find_converter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        hf_dir = Path(tmp) / "hf"
        if any(p.dtype != torch.float32 for p in language_model.parameters()):
            import copy

            language_model = copy.deepcopy(language_model).float()  # the caller's stays as is
        language_model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        part = Path(tmp) / out.name
        env = os.environ | {"PYTHONPATH": str(converter.parent / "gguf-py")}
        cmd = [sys.executable, str(converter), str(hf_dir), "--outfile", str(part)]
        run = subprocess.run([*cmd, "--outtype", outtype], env=env, capture_output=True, text=True)
        if run.returncode != 0 or not part.is_file():
            tail = "\n".join(run.stderr.strip().splitlines()[-5:])
            raise GGUFUnavailable(f"llama.cpp's converter failed:\n{tail}")
        os.replace(part, out)  # never a half-written GGUF at ``out``
    return out


def checkpoint_digest(path: str | os.PathLike) -> str:
    """Key of a checkpoint directory: its path and its files' sizes and modification times."""
    path = Path(path).resolve()
    h = hashlib.blake2b(str(path).encode(), digest_size=8)
    for f in sorted(path.glob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def gguf_for(pipe, checkpoint: str | os.PathLike, outtype: str = "q8_0") -> Path:
    """The cached GGUF of ``pipe``'s LM (converted on first use)."""
    from llavakit.demo import _cache_lock

    key = f"gguf-{Path(checkpoint).name}-{checkpoint_digest(checkpoint)}"
    out = _cache_root() / key / f"lm-{outtype}.gguf"
    if out.is_file():
        return out
    with _cache_lock(f"{key}-{outtype}"):
        if not out.is_file():
            print(
                f"llavakit: converting the language model to GGUF {outtype} once", file=sys.stderr
            )
            convert_lm(pipe.model.language_model, pipe.tokenizer, out, outtype)
    return out


class LlamaCppLM:
    """A GGUF language model in one llama.cpp context: ``n_seq`` sequences share a unified
    KV store of ``n_ctx`` cells (so a prefix can be shared by copying a sequence)."""

    def __init__(
        self,
        path: str | os.PathLike,
        n_ctx: int,
        n_seq: int = 1,
        n_threads: int | None = None,
        n_embd: int | None = None,
    ) -> None:
        try:
            import llama_cpp
            from llama_cpp._logger import set_verbose
        except ImportError as exc:
            raise GGUFUnavailable(
                "the GGUF backend needs llama-cpp-python: run `make llamacpp` (builds it from "
                "source)"
            ) from exc
        lib = self.lib = llama_cpp
        set_verbose(False)
        if not Path(path).is_file():
            raise GGUFUnavailable(f"{path}: no such GGUF file")
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(
            os.fspath(path).encode(), lib.llama_model_default_params()
        )
        if not self.model:
            raise GGUFUnavailable(f"llama.cpp could not load {path}")
        params = lib.llama_context_default_params()
        threads = n_threads or os.cpu_count() or 1
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, 512, 512
        params.n_seq_max, params.kv_unified, params.no_perf = n_seq, True, True
        # llama-cpp-python's default; flash attention decodes ~10% slower on this CPU
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise GGUFUnavailable(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.path, self.n_ctx, self.n_seq = Path(path), n_ctx, n_seq
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.mem = lib.llama_get_memory(self.ctx)
        self._tokens = lib.llama_batch_init(max(512, n_seq), 0, 1)
        self._embeds = lib.llama_batch_init(512, self.n_embd, 1)
        if n_embd is not None and self.n_embd != n_embd:
            self.close()
            raise GGUFUnavailable(f"{path}: hidden size {self.n_embd}, the model's is {n_embd}")

    def prefill(self, keys: list[Any], rows: list[np.ndarray | None], start: int, seq: int) -> None:
        """Evaluate positions ``start..`` of sequence ``seq``: runs of token ids and of
        embeddings (``rows[i]`` not None); logits of the last position only."""
        n = len(keys)
        i = start
        while i < n:
            embd = rows[i] is not None
            j = i
            while j < n and j - i < 512 and (rows[j] is not None) == embd:
                j += 1
            batch = self._embeds if embd else self._tokens
            batch.n_tokens = j - i
            for k in range(i, j):
                b = k - i
                if embd:
                    ctypes.memmove(
                        ctypes.addressof(batch.embd.contents) + 4 * b * self.n_embd,
                        rows[k].ctypes.data,
                        4 * self.n_embd,
                    )
                else:
                    batch.token[b] = keys[k]
                batch.pos[b], batch.n_seq_id[b], batch.seq_id[b][0] = k, 1, seq
                batch.logits[b] = k == n - 1
            self._decode(batch, f"positions {i}..{j - 1} of sequence {seq}")
            i = j

    def step(self, tokens: list[int], positions: list[int], seqs: list[int]) -> None:
        """One token for each of several sequences; logits of every row."""
        batch = self._tokens
        batch.n_tokens = len(tokens)
        for b, (tok, pos, seq) in enumerate(zip(tokens, positions, seqs, strict=True)):
            batch.token[b], batch.pos[b], batch.n_seq_id[b] = tok, pos, 1
            batch.seq_id[b][0], batch.logits[b] = seq, 1
        self._decode(batch, f"a decode step of {len(tokens)} sequences")

    def _decode(self, batch, what: str) -> None:
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            hint = " (the KV store is full)" if code == 1 else ""
            raise RuntimeError(f"llama_decode failed with {code} on {what}{hint}")

    def _view(self, row: int) -> np.ndarray:
        """llama.cpp's logits of output ``row`` of the last decode (-1 = the last), in place."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def logits(self, row: int = -1) -> torch.Tensor:
        """[V] float32 logits of output ``row`` (a copy)."""
        return torch.from_numpy(self._view(row).copy())

    def argmax(self, row: int = -1) -> int:
        """Greedy token of output ``row``, read in place."""
        return int(self._view(row).argmax())

    def remove(self, seq: int, start: int = -1) -> None:
        """Drop sequence ``seq``'s positions from ``start`` on (-1: all of them)."""
        self.lib.llama_memory_seq_rm(self.mem, seq, start, -1)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Sequence ``dst`` gets ``src``'s first ``length`` positions (cells are shared)."""
        self.lib.llama_memory_seq_cp(self.mem, src, dst, 0, length)

    def move(self, src: int, dst: int, length: int) -> None:
        """Sequence ``src`` becomes ``dst`` (the engine keeps running requests in 0..n-1)."""
        self.remove(dst)
        self.copy(src, dst, length)
        self.remove(src)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self._tokens)
            self.lib.llama_batch_free(self._embeds)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None


def encode_features(model, pixels: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One image's projected features as a contiguous float32 [tokens, hidden] array."""
    with torch.inference_mode():
        return np.ascontiguousarray(model.encode_images([pixels], [size]).float().numpy())


def prompt_rows(
    input_ids: list[int], image_token_id: int, feats: list[tuple[str, np.ndarray]]
) -> tuple[list[Any], list[np.ndarray | None]]:
    """One key per prompt position (token id, or (image key, row)) and its embedding row."""
    placeholders = sum(t == image_token_id for t in input_ids)
    features = sum(len(table) for _, table in feats)
    if placeholders != features:
        raise FeatureCountMismatch(placeholders, features)
    keys: list[Any] = []
    rows: list[np.ndarray | None] = []
    image, row = 0, 0
    for tok in input_ids:
        if tok != image_token_id:
            keys.append(int(tok))
            rows.append(None)
            continue
        key, table = feats[image]
        keys.append((key, row))
        rows.append(table[row])
        row += 1
        if row == len(table):
            image, row = image + 1, 0
    return keys, rows


class GGUFPipeline(Pipeline):
    """A ``Pipeline`` whose LM runs in llama.cpp (batch 1, thread-safe): ``chat``, ``stream``,
    ``generate_batch`` with the same arguments; the vision side is ``pipe``'s."""

    def __init__(
        self,
        pipe,
        gguf_path: str | os.PathLike,
        n_threads: int | None = None,
        n_ctx: int | None = None,
        feature_cache: int = 32,
    ) -> None:
        super().__init__(pipe.model, pipe.processor)
        self.pipe = pipe
        # 4096 by default (LLaVA-1.5's context): a larger KV store decodes a few % slower here
        self.max_context = min(n_ctx or 4096, pipe.model.config.max_context)
        hidden = self.model.config.text_config.hidden_size
        self.lm = LlamaCppLM(gguf_path, self.max_context, 1, n_threads, n_embd=hidden)
        self._eos = self.eos_token_ids()
        self._lock = threading.Lock()
        self._features = FeatureCache(feature_cache)
        self._kv: list[Any] = []  # what llama.cpp's KV holds, one key per position
        self.stats = {"prefilled": 0, "reused": 0, "image_cache_hits": 0, "generated": 0}

    def reset(self) -> None:
        """Forget the image-feature and prefix caches (the next prompt is evaluated whole)."""
        with self._lock:
            self._features.clear()
            self._kv = []

    def close(self) -> None:
        self.lm.close()

    def _image_features(self, encoded) -> list[tuple[str, np.ndarray]]:
        out = []
        for pixels, size in zip(encoded.pixel_values, encoded.image_sizes, strict=True):
            key = _pixel_key(pixels, size)
            feats, hit = self._features.get(key, encode_features, self.model, pixels, size)
            self.stats["image_cache_hits"] += hit
            out.append((key, feats))
        return out

    def _keys(self, encoded) -> tuple[list[Any], list[np.ndarray | None]]:
        image_id = self.model.config.image_token_id
        return prompt_rows(encoded.input_ids, image_id, self._image_features(encoded))

    def _prefill(self, keys: list[Any], rows: list[np.ndarray | None]) -> None:
        common = 0
        for a, b in zip(self._kv, keys, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(keys) - 1)  # evaluate at least one position for its logits
        self.lm.remove(0, common)
        self._kv = self._kv[:common]
        self.lm.prefill(keys, rows, common, 0)
        self._kv = list(keys)
        self.stats["reused"] += common
        self.stats["prefilled"] += len(keys) - common

    def _logits(self) -> torch.Tensor:
        return self.lm.logits(-1)

    def stream(
        self,
        images: list | None = None,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        system: str | None = None,
        **gen: Any,
    ) -> Iterator[str]:
        """Yield the answer piece by piece (greedy unless temperature > 0)."""
        cfg = self.generation_config(**gen)
        encoded = self.encode(images, prompt, messages=messages, system=system)
        with self._lock:
            if len(encoded.input_ids) >= self.max_context:
                raise PromptTooLong(len(encoded.input_ids), self.max_context)
            keys, rows = self._keys(encoded)
            budget = min(cfg.max_new_tokens, self.max_context - len(keys))
            if budget <= 0:
                return
            self._prefill(keys, rows)
            generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
            seen = [torch.tensor([k for k in keys if isinstance(k, int)], dtype=torch.long)]
            detok = Detokenizer(self.tokenizer, cfg.stop)
            plain_greedy = cfg.temperature == 0 and cfg.repetition_penalty == 1.0
            for step in range(budget):
                if plain_greedy:  # argmax in place: no copy of the vocabulary's logits
                    token = self.lm.argmax()
                else:
                    logits = process_logits(self._logits()[None], seen, cfg)
                    token = int(pick_tokens(logits, cfg, generator)[0])
                self.stats["generated"] += 1
                delta, end = accept_token(token, detok, cfg, self._eos)
                if end is None and step == budget - 1:
                    delta += detok.flush()
                if delta:
                    yield delta
                if end is not None or step == budget - 1:
                    return
                if not plain_greedy:  # what repetition penalty looks at
                    seen[0] = torch.cat([seen[0], torch.tensor([token])])
                self.lm.step([token], [len(self._kv)], [0])
                self._kv.append(token)

    def generate_batch(self, requests: list[dict], **gen: Any) -> list[str]:
        """``Pipeline.generate_batch``'s answers, computed one request after another (batch 1;
        ``GGUFEngine`` runs requests together)."""
        return [
            self.chat(
                r.get("images"),
                r.get("prompt"),
                messages=r.get("messages"),
                system=r.get("system"),
                **gen,
            )
            for r in requests
        ]


class GGUFEngine(Engine):
    """``Engine`` with the LM in llama.cpp: the same continuous batching (a request joins and
    leaves the running batch at every step), bounded queue, cancellation, per-request
    sampling, image-feature cache and counters. Running request ``i`` is llama.cpp sequence
    ``i``; a decode step is one ``llama_decode`` of one token per sequence. Finished
    conversations stay in up to ``prefix_entries`` spare sequences (a prefix cache: a
    follow-up copies the shared prefix, no tensor copies in a unified KV store). KV memory is
    fixed at ``kv_tokens`` cells (default: the context length, at most 16384), allocated once.
    """

    def __init__(
        self,
        pipe,
        gguf_path: str | os.PathLike,
        max_batch: int = 16,
        max_queue: int = 64,
        max_len: int | None = None,
        prefix_entries: int = 8,
        image_cache_entries: int = 128,
        n_threads: int | None = None,
        kv_tokens: int | None = None,
    ) -> None:
        self._gguf_path = Path(gguf_path)
        self._prefix_entries = prefix_entries
        self._n_threads = n_threads
        self._kv_tokens = kv_tokens = kv_tokens or min(16384, pipe.model.config.max_context)
        max_len = min(max_len or pipe.model.config.max_context, kv_tokens)
        super().__init__(
            pipe,
            max_batch=max_batch,
            max_queue=max_queue,
            max_len=max_len,
            image_cache_entries=image_cache_entries,
        )

    def _new_cache(self) -> LlamaCppLM:
        n_seq = self.max_batch + self._prefix_entries
        hidden = self.model.config.text_config.hidden_size
        self.lm = LlamaCppLM(self._gguf_path, self._kv_tokens, n_seq, self._n_threads, hidden)
        self._spare = list(range(self.max_batch, n_seq))  # sequences free for the prefix cache
        return self.lm

    def close(self) -> None:
        super().close()
        self.lm.close()

    def _encode_image(self, pixels: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        return encode_features(self.model, pixels, size)

    def _prefill(self, req, slot: int) -> tuple[int, torch.Tensor]:
        reused, src = self._lookup_prefix(req)
        self.lm.remove(slot)
        if reused:
            self.lm.copy(src, slot, reused)
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens_reused += reused
        ids, image_id = req.encoded.input_ids, self.model.config.image_token_id
        if any(t == image_id for t in ids[reused:]):
            feats = list(zip(req.image_keys, self._features_of(req), strict=True))
            keys, rows = prompt_rows(ids, image_id, feats)
        else:  # the cached prefix covers every image: no tower
            keys, rows = list(ids), [None] * len(ids)
        try:
            self.lm.prefill(keys, rows, reused, slot)
        except Exception:
            self.lm.remove(slot)
            raise
        return reused, self.lm.logits(-1)[None]

    def _store_prefix(self, run, slot: int) -> None:
        length = len(run.ids)
        key = (run.req.image_keys, tuple(run.ids))
        if length < 2 or not self._prefix_entries or key in self._prefixes:
            return
        if not self._spare:
            _, oldest = self._prefixes.popitem(last=False)
            self.lm.remove(oldest)
            self._spare.append(oldest)
        seq = self._spare.pop()
        self.lm.copy(slot, seq, length)
        self._prefixes[key] = seq

    def _release(self, run, reason: str) -> None:
        last = len(self._running) - 1
        super()._release(run, reason)  # stores the prefix, moves the last request into the slot
        self.lm.remove(last)  # that sequence is free now

    def _forward_step(self, runs: list) -> torch.Tensor:
        n = len(runs)
        self.lm.step([r.next_token for r in runs], [len(r.ids) for r in runs], list(range(n)))
        return torch.stack([self.lm.logits(i) for i in range(n)])


def load_gguf(
    path: str | os.PathLike | None = None,
    outtype: str = "q8_0",
    *,
    n_threads: int | None = None,
    **load_kwargs: Any,
) -> GGUFPipeline:
    """``llavakit.load`` with the language model in llama.cpp (converted once, then cached)."""
    import llavakit
    from llavakit.demo import resolve_model

    path = resolve_model(path)
    pipe = llavakit.load(path, **load_kwargs)
    return GGUFPipeline(pipe, gguf_for(pipe, path, outtype), n_threads=n_threads)


__all__ = [
    "GGUFEngine",
    "GGUFPipeline",
    "LlamaCppLM",
    "GGUFUnavailable",
    "checkpoint_digest",
    "convert_lm",
    "find_converter",
    "gguf_for",
    "load_gguf",
]
