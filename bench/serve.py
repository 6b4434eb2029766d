"""Serving benchmarks: llavakit's engine against transformers and llama.cpp, in the same run.

(a) batch-1 prefill time and decode tokens/s: transformers ``generate`` (bf16), llavakit bf16
    and int8, llama.cpp f16 / q8_0 when llama-cpp-python is installed (decode on a text prompt
    of the same length; image prefill through its LLaVA-1.5 handler with the mmproj GGUF);
(b) aggregate tokens/s and p50 / p99 time to first token with 1, 4 and 16 concurrent
    streaming clients of ``llavakit serve``, against sequential transformers generation and
    transformers' own continuous batching (``generate_batch``, language model only);
(c) time to first token of a second turn about the same image against the first turn;
(d) peak memory (max RSS) of each process.

Every configuration runs in its own process (clean memory numbers, no shared threads).
Models: the bundled demo model, and ``0.5b`` (a 0.5B-parameter Llama-shaped LM with a
CLIP ViT-L/14-336 tower, random weights built from configs; speed does not depend on values).

    .venv/bin/python bench/serve.py                 # everything, both models
    .venv/bin/python bench/serve.py --models demo --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("LLAVAKIT_CACHE", Path.home() / ".cache" / "llavakit"))
IMAGE = ROOT / "examples" / "scene.png"
QUESTION = "Describe the image in detail."


IMPLS = (
    "transformers",
    "llavakit",
    "llavakit-int8",
    "llavakit-int8w",
    "llavakit-gguf-f16",
    "llavakit-gguf-q8_0",
    "llamacpp-f16",
    "llamacpp-q8_0",
)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- models ---------------------------------------------------------------------------------
def model_dir(name: str) -> Path:
    """A transformers-layout checkpoint of ``name`` (built and cached on first use)."""
    if name == "demo":
        from llavakit.demo import demo_checkpoint

        out = CACHE / f"bench-{Path(demo_checkpoint()).name}-hf"  # follows the bundled weights
        if not out.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "llavakit",
                    "convert",
                    "demo",
                    str(out),
                    "--dtype",
                    "bfloat16",
                ],
                check=True,
            )
        return out
    out = CACHE / "bench-0.5b"
    if not out.exists():
        build_half_b(out)
    return out


def build_half_b(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig

    from llavakit.checkpoint.hf import save_hf
    from llavakit.config import LlavaConfig
    from llavakit.demo import smollm2_dir
    from llavakit.model.llava import LlavaForCausalLM
    from llavakit.processing.processor import LlavaProcessor

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(  # ViT-L/14 at 336 px, as LLaVA-1.5
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=1152,
        intermediate_size=3072,
        num_hidden_layers=24,
        num_attention_heads=18,
        num_key_value_heads=6,
        vocab_size=-(-len(tok) // 64) * 64,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_aspect_ratio="pad",
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_token_style="token",
        template="chatml_nosystem",
    )
    torch.manual_seed(0)
    model = LlavaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.language_model.parameters())
    print(f"built 0.5b: LM {n / 1e9:.2f}B parameters + CLIP ViT-L/14-336", file=sys.stderr)
    save_hf(model, LlavaProcessor(tok, config), out)


# -- (a) decode / prefill, one process per implementation ------------------------------------
def decode_rate(timed, tokens: int) -> dict:
    """``timed(n)`` = seconds to generate n tokens: warm up, then the best of three runs;
    decode tokens/s = (tokens - 1) / (time for ``tokens`` - time for 1)."""
    timed(2)
    prefill = min(timed(1) for _ in range(3))
    total = min(timed(tokens) for _ in range(3))
    return {"prefill_s": prefill, "decode_tok_s": (tokens - 1) / (total - prefill)}


def streamed_rate(run, tokens: int) -> dict:
    """``run(n)`` = (seconds to the first token, seconds to the n-th): warm up, then the best of
    three; decode tokens/s from the first token to the last of the same run, so a noisy
    prefill (a large tower, a long prompt) does not leak into the decode rate. Used for the two
    llama.cpp decoders, which are compared with each other."""
    run(2)
    runs = [run(tokens) for _ in range(3)]
    return {
        "prefill_s": min(first for first, _ in runs),
        "decode_tok_s": max((tokens - 1) / (total - first) for first, total in runs),
    }


def run_llavakit(model: str, tokens: int, quant: str | None) -> dict:
    import torch

    import llavakit
    from llavakit.engine.engine import Engine

    pipe = llavakit.load(model_dir(model), dtype="bfloat16")
    if quant:
        from llavakit.engine.quant import quantize_pipeline

        quantize_pipeline(pipe, quant)
    engine = Engine(pipe, max_batch=4)
    torch.set_num_threads(os.cpu_count() or 2)

    def timed(n: int, image=IMAGE) -> float:
        enc = pipe.encode([image], QUESTION)
        cfg = pipe.generation_config(max_new_tokens=n, ignore_eos=True)
        engine._features.clear(), engine._prefixes.clear()  # measure the full work each time
        start = time.perf_counter()
        handle = engine.submit(enc, cfg)
        handle.text()
        assert handle.finish.completion_tokens == n
        return time.perf_counter() - start

    out = decode_rate(timed, tokens)
    out |= second_turn(pipe, engine)
    out["image_answer"] = pipe.chat([IMAGE], QUESTION, max_new_tokens=16)  # vs llama.cpp's
    engine.close()
    return out | {"peak_mb": peak_mb()}


def run_llavakit_gguf(model: str, tokens: int, quant: str) -> dict:
    """llavakit's GGUF backend: image features from llavakit, the LM in llama.cpp."""
    import llavakit
    from llavakit.engine.gguf import GGUFPipeline

    paths = gguf_paths(model)
    if paths is None:
        return {"error": "llama.cpp converter unavailable"}
    pipe = llavakit.load(model_dir(model), dtype="bfloat16")
    gg = GGUFPipeline(pipe, paths[quant], n_threads=os.cpu_count() or 2)

    def timed(n: int) -> tuple[float, float]:
        gg.reset()  # measure the full work each time: no feature or prefix cache
        before = gg.stats["generated"]
        start, first = time.perf_counter(), None
        for _ in gg.stream([IMAGE], QUESTION, max_new_tokens=n, ignore_eos=True):
            first = first or time.perf_counter() - start
        assert gg.stats["generated"] - before == n
        return first, time.perf_counter() - start

    out = streamed_rate(timed, tokens)
    out["image_answer"] = gg.chat([IMAGE], QUESTION, max_new_tokens=16)
    out["image_answer_torch"] = pipe.chat([IMAGE], QUESTION, max_new_tokens=16)
    out |= second_turn_gguf(gg)
    gg.close()
    return out | {"peak_mb": peak_mb()}


def run_decode_parity(model: str, tokens: int, rounds: int = 6) -> dict:
    """llavakit's GGUF decode against llama.cpp's own (q8_0, same file) in one process,
    alternating runs so both see the same machine state; median and per-round ratios."""
    from llama_cpp import Llama

    import llavakit
    from llavakit.engine.gguf import GGUFPipeline

    path = gguf_paths(model)["q8_0"]
    pipe = llavakit.load(model_dir(model), dtype="bfloat16")
    gg = GGUFPipeline(pipe, path, n_threads=os.cpu_count() or 2)
    prompt_ids = [t for t in pipe.encode([IMAGE], QUESTION).input_ids if t >= 0]
    prompt_ids = [t if t != pipe.model.config.image_token_id else 0 for t in prompt_ids]
    llm = Llama(str(path), n_ctx=2048, n_threads=os.cpu_count() or 2, verbose=False)

    def ours() -> float:
        gg.reset()
        first = None
        for _ in gg.stream([IMAGE], QUESTION, max_new_tokens=tokens, ignore_eos=True):
            first = first or time.perf_counter()
        return (tokens - 1) / (time.perf_counter() - first)

    def theirs() -> float:
        llm.reset()
        got, first = 0, None
        for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            got += 1
            first = first or time.perf_counter()
            if got >= tokens:
                break
        return (tokens - 1) / (time.perf_counter() - first)

    ours(), theirs()  # warm up
    pairs = [(ours(), theirs()) for _ in range(rounds)]
    ratios = sorted(a / b for a, b in pairs)
    return {
        "llavakit_gguf_q8_0_tok_s": statistics.median(a for a, _ in pairs),
        "llamacpp_q8_0_tok_s": statistics.median(b for _, b in pairs),
        "ratio_median": statistics.median(ratios),
        "ratios": [round(r, 3) for r in ratios],
        "note": "alternating runs in one process, decode from the first token to the last",
    }


def second_turn_gguf(gg) -> dict:
    """(c) for the GGUF backend: follow-up TTFT with its feature and prefix caches."""
    from PIL import Image

    image = Image.open(IMAGE).convert("RGB").resize((300, 280))
    first_q = [{"role": "user", "content": "<image>\nWhat is in the image?"}]
    gg.reset()
    answer = gg.chat([image], messages=first_q, max_new_tokens=16)
    gg.reset()
    start = time.perf_counter()
    gg.chat([image], messages=first_q, max_new_tokens=1, ignore_eos=True)
    first = time.perf_counter() - start
    gg.reset()
    gg.chat([image], messages=first_q, max_new_tokens=16)  # fills the caches
    messages = first_q + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "What colour is the circle?"},
    ]
    start = time.perf_counter()
    gg.chat([image], messages=messages, max_new_tokens=1, ignore_eos=True)
    return {"first_turn_ttft_s": first, "second_turn_ttft_s": time.perf_counter() - start}


def second_turn(pipe, engine) -> dict:
    """(c) TTFT of a follow-up about the same image vs the first turn (fresh caches)."""
    from PIL import Image

    image = Image.open(IMAGE).convert("RGB").resize((300, 280))  # a picture not seen before
    engine._features.clear(), engine._prefixes.clear()

    def ttft(enc) -> tuple[float, str]:
        start = time.perf_counter()
        handle = engine.submit(enc, pipe.generation_config(max_new_tokens=1, ignore_eos=True))
        text = handle.text()
        return time.perf_counter() - start, text

    first_enc = pipe.encode([image], "What is in the image?")
    # the first turn's answer, as a client would send it back
    answer = engine.submit(first_enc, pipe.generation_config(max_new_tokens=16)).text()
    engine._features.clear(), engine._prefixes.clear()
    first, _ = ttft(first_enc)
    engine.submit(first_enc, pipe.generation_config(max_new_tokens=16)).text()  # fills the caches
    messages = [
        {"role": "user", "content": "<image>\nWhat is in the image?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "What colour is the circle?"},
    ]
    second, _ = ttft(pipe.processor.encode(images=[image], messages=messages))
    return {"first_turn_ttft_s": first, "second_turn_ttft_s": second}


def run_transformers(model: str, tokens: int) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    import llavakit

    path = model_dir(model)
    pipe = llavakit.load(path, dtype="bfloat16")  # only to build identical inputs
    enc = pipe.encode([IMAGE], QUESTION)
    ids = torch.tensor([enc.input_ids])
    pixels = enc.pixel_values[0].to(torch.bfloat16)
    del pipe
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=pixels,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )
        assert out.shape[1] - ids.shape[1] == n
        return time.perf_counter() - start

    return decode_rate(timed, tokens) | {"peak_mb": peak_mb()}


def gguf_dir(model: str) -> Path:
    """Where the GGUF conversions of ``model`` are cached (next to its checkpoint)."""
    path = model_dir(model)
    return path.with_name(path.name + "-gguf")


def gguf_paths(model: str) -> dict[str, Path] | None:
    """The LM of ``model`` as GGUF f16 / q8_0 via llama.cpp's converter (None if unavailable)."""
    from llavakit.engine.gguf import GGUFUnavailable, convert_lm

    out = gguf_dir(model)
    paths = {q: out / f"lm-{q}.gguf" for q in ("f16", "q8_0")}
    if all(p.exists() for p in paths.values()):
        return paths
    import llavakit

    pipe = llavakit.load(model_dir(model), dtype="float32")
    try:
        for q, path in paths.items():
            if not path.exists():
                convert_lm(pipe.model.language_model, pipe.tokenizer, path, q)
    except GGUFUnavailable:
        return None
    return paths


# llama.cpp's LLaVA-1.5 image-encoder converter expects transformers 4's CLIPVisionModel layout
# (``model.vision_model.*``); transformers 5 flattened it. Run the script with that layout back.
V4_LAYOUT = """
import runpy, sys, torch, transformers
load = transformers.CLIPVisionModel.from_pretrained
class V4Layout(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.vision_model = inner
transformers.CLIPVisionModel.from_pretrained = lambda *a, **k: V4Layout(load(*a, **k))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def mmproj_path(model: str) -> Path | None:
    """The vision tower + projector of ``model`` as a llama.cpp mmproj GGUF (LLaVA-1.5 layout).

    llama.cpp's HF converter only takes Pixtral-style llava towers, so this uses its LLaVA-1.5
    route: tower as a CLIPVisionModel directory + ``llava.projector`` (``mm.0`` / ``mm.2``)
    through ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py``.
    """
    out = gguf_dir(model)
    path = out / "mmproj-model-f16.gguf"
    if path.exists():
        return path
    converter = find_converter()
    script = (
        converter and converter.parent / "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"
    )
    if script is None or not script.exists():
        return None
    import torch

    import llavakit

    pipe = llavakit.load(model_dir(model), dtype="float32")
    cfg = pipe.model.config
    if cfg.projector_type != "mlp2x_gelu" or cfg.vision_config.model_type != "clip_vision_model":
        return None
    tower_dir = out / "tower-hf"
    pipe.model.vision_tower.save_pretrained(tower_dir)  # a transformers CLIPVisionModel
    conf = json.loads((tower_dir / "config.json").read_text())
    conf["vision_feature_layer"] = cfg.vision_feature_layer
    conf["projection_dim"] = cfg.text_config.hidden_size
    (tower_dir / "config.json").write_text(json.dumps(conf))
    proj = pipe.model.multi_modal_projector
    torch.save(
        {
            "mm.0.weight": proj.linear_1.weight.detach(),
            "mm.0.bias": proj.linear_1.bias.detach(),
            "mm.2.weight": proj.linear_2.weight.detach(),
            "mm.2.bias": proj.linear_2.bias.detach(),
        },
        tower_dir / "llava.projector",
    )
    env = os.environ | {"PYTHONPATH": str(converter.parent / "gguf-py")}
    cmd = [sys.executable, "-c", V4_LAYOUT, str(script), "-m", str(tower_dir)]
    cmd += ["--clip-model-is-vision"]
    cmd += ["--llava-projector", str(tower_dir / "llava.projector"), "-o", str(out)]
    cmd += ["--image-mean", *map(str, cfg.image_mean), "--image-std", *map(str, cfg.image_std)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return path if path.exists() else None


def find_converter() -> Path | None:
    from llavakit.engine.gguf import GGUFUnavailable
    from llavakit.engine.gguf import find_converter as find

    try:
        return find()
    except GGUFUnavailable:
        return None


def run_llamacpp(model: str, tokens: int, quant: str) -> dict:
    from llama_cpp import Llama

    import llavakit

    paths = gguf_paths(model)
    if paths is None:
        return {"error": "llama.cpp converter unavailable"}
    pipe = llavakit.load(model_dir(model), dtype="bfloat16")
    # same prompt length as the image prompt (decode speed depends on the context length)
    prompt_ids = [t for t in pipe.encode([IMAGE], QUESTION).input_ids if t >= 0]
    prompt_ids = [t if t != pipe.model.config.image_token_id else 0 for t in prompt_ids]
    del pipe
    llm = Llama(
        str(paths[quant]),
        n_ctx=2048,
        n_threads=os.cpu_count() or 2,
        verbose=False,
        logits_all=False,
    )

    def timed(n: int) -> tuple[float, float]:
        llm.reset()
        start, first = time.perf_counter(), None
        got = 0
        for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, logits_processor=None, reset=True):
            got += 1
            first = first or time.perf_counter() - start
            if got >= n:
                break
        return first, time.perf_counter() - start

    result = streamed_rate(timed, tokens)
    mmproj = mmproj_path(model)
    if mmproj is not None:
        result |= llamacpp_image_prefill(llm, mmproj)
    return result | {
        "peak_mb": peak_mb(),
        "note": "decode: text prompt of the image prompt's length; image prefill: LLaVA-1.5 "
        "chat handler with the mmproj (CLIP tower + projector in GGUF)",
    }


def llamacpp_image_prefill(llm, mmproj: Path) -> dict:
    """Time to the first token of an image question through llama.cpp's LLaVA-1.5 handler."""
    import base64

    from llama_cpp.llama_chat_format import Llava15ChatHandler

    class ChatMLLlava(Llava15ChatHandler):
        """LLaVA-1.5 image handling with the ChatML prompt the demo model was trained on."""

        CHAT_FORMAT = (
            "{% for m in messages %}<|im_start|>{{ m.role }}\n"
            "{% if m.content is string %}{{ m.content }}{% else %}"
            "{% for c in m.content %}{% if c.type == 'image_url' %}{{ c.image_url.url }}\n"
            "{% endif %}{% endfor %}{% for c in m.content %}{% if c.type == 'text' %}"
            "{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )

    llm.chat_handler = ChatMLLlava(clip_model_path=str(mmproj), verbose=False)
    url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]

    def first_token() -> float:
        llm.reset()
        start = time.perf_counter()
        stream = llm.create_chat_completion(messages, max_tokens=2, temperature=0.0, stream=True)
        for chunk in stream:
            if chunk["choices"][0]["delta"].get("content"):
                break
        return time.perf_counter() - start

    first_token()
    llm.reset()
    answer = llm.create_chat_completion(messages, max_tokens=16, temperature=0.0)
    return {
        "prefill_image_s": min(first_token() for _ in range(3)),
        "image_answer": answer["choices"][0]["message"]["content"],
    }


# -- (b) concurrency through the HTTP server --------------------------------------------------
def run_concurrency(model: str, tokens: int, levels: list[int], gguf: str | None = None) -> dict:
    import base64

    import httpx
    import uvicorn

    import llavakit
    from llavakit.serve.api import ModelServer, create_app

    pipe = llavakit.load(model_dir(model), dtype="bfloat16")
    engine = None
    if gguf:  # the server's engine with the LM in llama.cpp
        from llavakit.engine.gguf import GGUFEngine

        engine = GGUFEngine(pipe, gguf_paths(model)[gguf], max_batch=16, max_queue=64)
    server = ModelServer(pipe, "bench", max_batch=16, max_queue=64, engine=engine)
    app = create_app(server, ui=False)
    port = 18765
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    data = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()

    def client(i: int, out: list) -> None:
        body = {
            "model": "bench",
            "stream": True,
            "max_tokens": tokens,
            "ignore_eos": True,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data}},
                        {
                            "type": "text",
                            "text": f"{QUESTION} ({i})",
                        },  # distinct prompts: no prefix reuse
                    ],
                }
            ],
        }
        start = time.perf_counter()
        first = None
        with httpx.stream("POST", url, json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content": "' in line and first is None:
                    if '"content": ""' not in line:
                        first = time.perf_counter() - start
        out.append((first, time.perf_counter() - start))

    results = {}
    client(-1, [])  # warm-up
    for n in levels:
        out: list = []
        threads = [threading.Thread(target=client, args=(i, out)) for i in range(n)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        ttfts = sorted(f for f, _ in out if f is not None)
        results[str(n)] = {
            "tok_s": n * tokens / wall,
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        }
    uv.should_exit = True
    server.close()
    return results | {"peak_mb": peak_mb()}


def run_sequential_transformers(model: str, tokens: int, n: int) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    import llavakit

    path = model_dir(model)
    pipe = llavakit.load(path, dtype="bfloat16")
    encs = [pipe.encode([IMAGE], f"{QUESTION} ({i})") for i in range(n)]
    del pipe
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    start = time.perf_counter()
    for enc in encs:
        ids = torch.tensor([enc.input_ids])
        with torch.inference_mode():
            hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=enc.pixel_values[0].to(torch.bfloat16),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
    wall = time.perf_counter() - start
    return {"tok_s": n * tokens / wall, "peak_mb": peak_mb()}


def run_transformers_cb(model: str, tokens: int, n: int) -> dict:
    """transformers' own continuous batching (``generate_batch``) on ``n`` prompts at once.

    ``generate_batch`` takes token lists only (no pixel values), so it runs the language model on
    a text prompt of the image prompt's length, like the llama.cpp rows.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    import llavakit

    pipe = llavakit.load(model_dir(model), dtype="bfloat16")
    image_id = pipe.model.config.image_token_id
    prompts = []
    for i in range(n):
        ids = pipe.encode([IMAGE], f"{QUESTION} ({i})").input_ids
        prompts.append([0 if t == image_id or t < 0 else t for t in ids])
    lm = pipe.model.language_model.eval()
    del pipe
    config = GenerationConfig(
        max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    # its worker thread updates tensors in place: no inference_mode (it uses no_grad itself)
    cb = ContinuousBatchingConfig(max_memory_percent=0.2)
    lm.generate_batch(prompts[:2], config, cb, max_new_tokens=4)  # warm-up
    start = time.perf_counter()
    out = lm.generate_batch(prompts, config, cb)
    wall = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in out.values())
    errors = [o.error for o in out.values() if o.error]
    if not generated or errors:
        return {"error": f"generate_batch: {errors[0] if errors else 'no tokens generated'}"}
    return {
        "tok_s": generated / wall,
        "generated": generated,
        "peak_mb": peak_mb(),
        "note": "LM only, text prompt of the same length (generate_batch takes no images)",
    }


# -- driver -----------------------------------------------------------------------------------
def child(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,0.5b")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--child", nargs="*")
    parser.add_argument(
        "--only", default="", help="re-run these rows (comma list), keep the others from --out"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()
    if args.child is not None:
        kind, model, tokens, *rest = args.child
        tokens = int(tokens)
        result = {
            "transformers": lambda: run_transformers(model, tokens),
            "llavakit": lambda: run_llavakit(model, tokens, None),
            "llavakit-int8": lambda: run_llavakit(model, tokens, "int8"),
            "llavakit-int8w": lambda: run_llavakit(model, tokens, "int8w"),
            "llavakit-gguf-f16": lambda: run_llavakit_gguf(model, tokens, "f16"),
            "llavakit-gguf-q8_0": lambda: run_llavakit_gguf(model, tokens, "q8_0"),
            "llamacpp-f16": lambda: run_llamacpp(model, tokens, "f16"),
            "decode-parity": lambda: run_decode_parity(model, tokens),
            "llamacpp-q8_0": lambda: run_llamacpp(model, tokens, "q8_0"),
            "concurrency": lambda: run_concurrency(
                model, tokens, [int(x) for x in rest[0].split(",")]
            ),
            "concurrency-gguf": lambda: run_concurrency(
                model, tokens, [int(x) for x in rest[0].split(",")], "q8_0"
            ),
            "sequential": lambda: run_sequential_transformers(model, tokens, int(rest[0])),
            "transformers-cb": lambda: run_transformers_cb(model, tokens, int(rest[0])),
        }[kind]()
        print(json.dumps(result))
        return
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}  # other models' rows stay
    clients = args.clients
    top = str(max(int(c) for c in clients.split(",")))
    jobs = {impl: [impl, "{model}", str(args.tokens)] for impl in IMPLS}
    jobs["concurrency"] = ["concurrency", "{model}", "32", clients]
    jobs["decode-parity"] = ["decode-parity", "{model}", str(args.tokens)]
    jobs["concurrency-gguf-q8_0"] = ["concurrency-gguf", "{model}", "32", clients]
    jobs["sequential-transformers"] = ["sequential", "{model}", "32", top]
    jobs["transformers-cb"] = ["transformers-cb", "{model}", "32", top]
    wanted = args.only.split(",") if args.only else list(jobs)
    unknown = set(wanted) - set(jobs)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {sorted(jobs)}")
    for model in args.models.split(","):
        model_dir(model)  # build / convert once, outside the timed children
        r = report.get(model, {}) if args.only else {}  # a full run replaces the model
        report[model] = r
        for name in wanted:
            r[name] = child([a.format(model=model) for a in jobs[name]])
            print(model, name, json.dumps(r[name]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report, args.clients))


def summary(report: dict, clients: str) -> str:
    lines = []
    for model, r in report.items():
        t = r["transformers"]
        lines.append(f"\n## {model}")
        lines.append(
            "| engine | prefill with image (s) | decode tok/s | vs transformers | peak MB |"
        )
        lines.append("|---|---|---|---|---|")
        for impl in IMPLS:
            x = r.get(impl, {"error": "not run"})
            if "error" in x:
                lines.append(f"| {impl} | - | - | - | {x['error']} |")
                continue
            ratio = x["decode_tok_s"] / t["decode_tok_s"] if "decode_tok_s" in t else float("nan")
            prefill = f"{x['prefill_s']:.3f}"
            if impl.startswith("llamacpp"):  # its decode prompt is text; image prefill apart
                prefill = f"{x['prefill_image_s']:.3f}" if "prefill_image_s" in x else "-"
                prefill += f" (text-only {x['prefill_s']:.3f})"
            lines.append(
                f"| {impl} | {prefill} | {x['decode_tok_s']:.1f} | {ratio:.2f}x | "
                f"{x['peak_mb']:.0f} |"
            )
        q8, i8 = r.get("llamacpp-q8_0", {}), r.get("llavakit-int8", {})
        if "decode_tok_s" in q8 and "decode_tok_s" in i8:
            lines.append(
                f"llavakit int8 / llama.cpp q8_0 decode: "
                f"{i8['decode_tok_s'] / q8['decode_tok_s']:.2f}x"
            )
        g8 = r.get("llavakit-gguf-q8_0", {})
        if "decode_tok_s" in q8 and "decode_tok_s" in g8:
            lines.append(
                f"llavakit gguf q8_0 / llama.cpp q8_0: decode "
                f"{g8['decode_tok_s'] / q8['decode_tok_s']:.2f}x, image prefill "
                f"{q8.get('prefill_image_s', float('nan')) / g8['prefill_s']:.2f}x faster"
            )
        dp = r.get("decode-parity", {})
        if "ratio_median" in dp:
            lines.append(
                f"decode parity (alternating runs, one process): llavakit gguf q8_0 "
                f"{dp['llavakit_gguf_q8_0_tok_s']:.1f} vs llama.cpp q8_0 "
                f"{dp['llamacpp_q8_0_tok_s']:.1f} tok/s, median ratio {dp['ratio_median']:.2f}x "
                f"(rounds: {', '.join(f'{x:.2f}' for x in dp['ratios'])})"
            )
        s = r.get("sequential-transformers", {"error": "not run"})
        for row in ("concurrency", "concurrency-gguf-q8_0"):
            c = r.get(row, {"error": "not run"})
            if "error" in c or "error" in s:
                continue
            lines.append(
                f"| clients ({row}) | llavakit tok/s | TTFT p50 (s) | TTFT p99 (s) | "
                "vs sequential transformers |"
            )
            lines.append("|---|---|---|---|---|")
            for n in clients.split(","):
                x = c[n]
                lines.append(
                    f"| {n} | {x['tok_s']:.1f} | {x['ttft_p50_s']:.3f} | {x['ttft_p99_s']:.3f} | "
                    f"{x['tok_s'] / s['tok_s']:.2f}x |"
                )
            cb, top = r.get("transformers-cb", {}), max(clients.split(","), key=int)
            if cb.get("tok_s"):
                lines.append(
                    f"transformers generate_batch ({top} prompts, LM only): {cb['tok_s']:.1f} tok/s; "
                    f"{row} {top} clients / generate_batch = {c[top]['tok_s'] / cb['tok_s']:.2f}x"
                )
        if "error" not in s:
            lines.append(f"sequential transformers: {s['tok_s']:.1f} tok/s")
        for impl in ("llavakit", "llavakit-gguf-q8_0"):
            lk = r.get(impl, {})
            if "second_turn_ttft_s" in lk:
                lines.append(
                    f"{impl}: second turn TTFT {lk['second_turn_ttft_s']:.3f}s vs first "
                    f"{lk['first_turn_ttft_s']:.3f}s = "
                    f"{lk['second_turn_ttft_s'] / lk['first_turn_ttft_s']:.0%}"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
