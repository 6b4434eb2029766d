"""Serving benchmarks: llavakit's engine against transformers and llama.cpp, in the same run.

(a) batch-1 prefill time and decode tokens/s: transformers ``generate`` (bf16), llavakit bf16
    and int8, llama.cpp f16 / q8_0 (text decode, when llama-cpp-python is installed);
(b) aggregate tokens/s and p50 / p99 time to first token with 1, 4 and 16 concurrent
    streaming clients of ``llavakit serve``, against sequential transformers generation;
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
    """``timed(n)`` = seconds to generate n tokens: warm up, then the best of a few runs;
    decode tokens/s = (tokens - 1) / (time for ``tokens`` - time for 1)."""
    timed(2)
    prefill = min(timed(1) for _ in range(3))
    total = min(timed(tokens) for _ in range(2))
    return {"prefill_s": prefill, "decode_tok_s": (tokens - 1) / (total - prefill)}


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
    engine.close()
    return out | {"peak_mb": peak_mb()}


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


def gguf_paths(model: str) -> dict[str, Path] | None:
    """The LM of ``model`` as GGUF f16 / q8_0 via llama.cpp's converter (None if unavailable)."""
    out = model_dir(model).with_name(model_dir(model).name + "-gguf")
    paths = {q: out / f"lm-{q}.gguf" for q in ("f16", "q8_0")}
    if all(p.exists() for p in paths.values()):
        return paths
    converter = find_converter()
    if converter is None:
        return None
    import torch

    import llavakit

    pipe = llavakit.load(model_dir(model), dtype="float32")
    lm_dir = out / "lm-hf"
    pipe.model.language_model.save_pretrained(lm_dir)
    pipe.tokenizer.save_pretrained(lm_dir)
    del pipe, torch
    env = os.environ | {"PYTHONPATH": str(converter.parent / "gguf-py")}
    for q in paths:
        subprocess.run(
            [
                sys.executable,
                str(converter),
                str(lm_dir),
                "--outfile",
                str(paths[q]),
                "--outtype",
                q,
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    return paths


def find_converter() -> Path | None:
    src = CACHE / "llama-cpp-src"
    hits = list(src.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if hits:
        return hits[0]
    try:
        src.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "llama-cpp-python",
                "-d",
                str(src),
            ],
            check=True,
            capture_output=True,
        )
        archive = next(src.glob("llama_cpp_python-*.tar.gz"))
        subprocess.run(["tar", "xzf", str(archive), "-C", str(src)], check=True)
    except (subprocess.CalledProcessError, StopIteration):
        return None
    hits = list(src.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return hits[0] if hits else None


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

    def timed(n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        got = 0
        for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, logits_processor=None, reset=True):
            got += 1
            if got >= n:
                break
        return time.perf_counter() - start

    return decode_rate(timed, tokens) | {
        "peak_mb": peak_mb(),
        "note": "text prompt of the same length (no image encoder)",
    }


# -- (b) concurrency through the HTTP server --------------------------------------------------
def run_concurrency(model: str, tokens: int, levels: list[int]) -> dict:
    import base64

    import httpx
    import uvicorn

    import llavakit
    from llavakit.serve.api import ModelServer, create_app

    pipe = llavakit.load(model_dir(model), dtype="bfloat16")
    server = ModelServer(pipe, "bench", max_batch=16, max_queue=64)
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
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()
    if args.child is not None:
        kind, model, tokens, *rest = args.child
        tokens = int(tokens)
        result = {
            "transformers": lambda: run_transformers(model, tokens),
            "llavakit": lambda: run_llavakit(model, tokens, None),
            "llavakit-int8": lambda: run_llavakit(model, tokens, "int8"),
            "llamacpp-f16": lambda: run_llamacpp(model, tokens, "f16"),
            "llamacpp-q8_0": lambda: run_llamacpp(model, tokens, "q8_0"),
            "concurrency": lambda: run_concurrency(
                model, tokens, [int(x) for x in rest[0].split(",")]
            ),
            "sequential": lambda: run_sequential_transformers(model, tokens, int(rest[0])),
        }[kind]()
        print(json.dumps(result))
        return
    report = {}
    for model in args.models.split(","):
        model_dir(model)  # build / convert once, outside the timed children
        r = {}
        for impl in ("transformers", "llavakit", "llavakit-int8", "llamacpp-f16", "llamacpp-q8_0"):
            r[impl] = child([impl, model, str(args.tokens)])
            print(model, impl, json.dumps(r[impl]), flush=True)
        clients = args.clients
        r["concurrency"] = child(["concurrency", model, "32", clients])
        print(model, "concurrency", json.dumps(r["concurrency"]), flush=True)
        top = max(int(c) for c in clients.split(","))
        r["sequential-transformers"] = child(["sequential", model, "32", str(top)])
        print(model, "sequential", json.dumps(r["sequential-transformers"]), flush=True)
        report[model] = r
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report, args.clients))


def summary(report: dict, clients: str) -> str:
    lines = []
    for model, r in report.items():
        t = r["transformers"]
        lines.append(f"\n## {model}")
        lines.append("| engine | prefill (s) | decode tok/s | vs transformers | peak MB |")
        lines.append("|---|---|---|---|---|")
        for impl in ("transformers", "llavakit", "llavakit-int8", "llamacpp-f16", "llamacpp-q8_0"):
            x = r[impl]
            if "error" in x:
                lines.append(f"| {impl} | - | - | - | {x['error']} |")
                continue
            ratio = x["decode_tok_s"] / t["decode_tok_s"] if "decode_tok_s" in t else float("nan")
            lines.append(
                f"| {impl} | {x['prefill_s']:.3f} | {x['decode_tok_s']:.1f} | {ratio:.2f}x | "
                f"{x['peak_mb']:.0f} |"
            )
        q8 = r["llamacpp-q8_0"]
        if "decode_tok_s" in q8 and "decode_tok_s" in r["llavakit-int8"]:
            lines.append(
                f"llavakit int8 / llama.cpp q8_0 decode: "
                f"{r['llavakit-int8']['decode_tok_s'] / q8['decode_tok_s']:.2f}x"
            )
        c, s = r["concurrency"], r["sequential-transformers"]
        if "error" not in c and "error" not in s:
            lines.append(
                "| clients | llavakit tok/s | TTFT p50 (s) | TTFT p99 (s) | vs sequential transformers |"
            )
            lines.append("|---|---|---|---|---|")
            for n in clients.split(","):
                x = c[n]
                lines.append(
                    f"| {n} | {x['tok_s']:.1f} | {x['ttft_p50_s']:.3f} | {x['ttft_p99_s']:.3f} | "
                    f"{x['tok_s'] / s['tok_s']:.2f}x |"
                )
            lines.append(f"sequential transformers: {s['tok_s']:.1f} tok/s")
        lk = r["llavakit"]
        if "second_turn_ttft_s" in lk:
            lines.append(
                f"second turn TTFT {lk['second_turn_ttft_s']:.3f}s vs first {lk['first_turn_ttft_s']:.3f}s "
                f"= {lk['second_turn_ttft_s'] / lk['first_turn_ttft_s']:.0%}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
