"""Gradio web UI: upload an image, chat, watch the answer stream; settings; side-by-side.

One builder serves both front ends: the UI mounted on ``llavakit serve`` (talks to the engine
in-process) and ``llavakit web`` (lists the controller's models, streams from its workers,
and can compare two models on the same question).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image

# stream(model, image, history, question, settings) -> cumulative answer texts
StreamFn = Callable[[str, Image.Image | None, list[dict], str, dict], Iterator[str]]


def history_to_messages(image: Image.Image | None, history: list[dict], question: str) -> tuple:
    """Gradio history (text turns) + new question -> llavakit messages and images."""
    from llavakit.processing.processor import IMAGE

    messages = [
        {"role": m["role"], "content": _text(m["content"])}
        for m in history
        if m.get("role") in ("user", "assistant")
    ]
    messages.append({"role": "user", "content": question})
    images = []
    if image is not None:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first] = {"role": "user", "content": IMAGE + "\n" + messages[first]["content"]}
        images = [image]
    return messages, images


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio 6 message content: list of {"type": "text", ...}
        return "".join(c.get("text", "") for c in content if isinstance(c, dict))
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content)


def build_ui(
    list_models: Callable[[], list[str]],
    stream: StreamFn,
    title: str = "llavakit",
    side_by_side: bool = False,
):
    """A gr.Blocks app; with ``side_by_side`` two chats answer every question."""
    import gradio as gr

    panes = 2 if side_by_side else 1
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nUpload an image, ask about it; answers stream as they are made.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", elem_id="llavakit-image")
                with gr.Accordion("Settings", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p")
                    max_tokens = gr.Slider(8, 1024, value=256, step=8, label="Max new tokens")
                refresh = gr.Button("Refresh models", size="sm")
            with gr.Column(scale=2 * panes):
                with gr.Row():
                    selectors, chats = [], []
                    for i in range(panes):
                        with gr.Column():
                            models = list_models()
                            selectors.append(
                                gr.Dropdown(
                                    models,
                                    value=models[min(i, len(models) - 1)] if models else None,
                                    label="Model" if panes == 1 else f"Model {'AB'[i]}",
                                    elem_id=f"llavakit-model-{i}",
                                )
                            )
                            chats.append(
                                gr.Chatbot(label="Chat", height=420, elem_id=f"llavakit-chat-{i}")
                            )
                question = gr.Textbox(
                    placeholder="Ask about the image and press Enter",
                    show_label=False,
                    elem_id="llavakit-question",
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="llavakit-send")
                    clear = gr.Button("Clear")

        def respond(q, img, temp, tp, mx, *args):
            names, histories = args[:panes], [list(h or []) for h in args[panes:]]
            if not q or not q.strip():
                yield ("", *histories)
                return
            settings = {"temperature": temp, "top_p": tp, "max_tokens": int(mx)}
            gens = [stream(names[i], img, histories[i], q, settings) for i in range(panes)]
            outs = [
                [*h, {"role": "user", "content": q}, {"role": "assistant", "content": ""}]
                for h in histories
            ]
            live = list(range(panes))
            yield ("", *outs)  # clear the box once; later updates leave what the user types
            while live:
                for i in list(live):
                    try:
                        outs[i][-1] = {"role": "assistant", "content": next(gens[i])}
                    except StopIteration:
                        live.remove(i)
                    except Exception as exc:  # shown in the chat, not a spinner forever
                        outs[i][-1] = {"role": "assistant", "content": f"⚠️ error: {exc}"}
                        live.remove(i)
                yield (gr.skip(), *outs)

        inputs = [question, image, temperature, top_p, max_tokens, *selectors, *chats]
        send.click(respond, inputs, [question, *chats], trigger_mode="always_last")
        question.submit(respond, inputs, [question, *chats], trigger_mode="always_last")
        clear.click(lambda: ("", *([[]] * panes)), None, [question, *chats])
        image.change(lambda _: [[]] * panes if panes > 1 else [], image, chats)

        def refreshed():
            models = list_models()
            return [
                gr.Dropdown(
                    choices=models, value=models[min(i, len(models) - 1)] if models else None
                )
                for i in range(panes)
            ]

        refresh.click(refreshed, None, selectors)
    return demo


def engine_stream(server) -> StreamFn:
    """Stream answers from a ModelServer's engine (the UI mounted on ``llavakit serve``)."""

    def stream(model, image, history, question, settings) -> Iterator[str]:
        messages, images = history_to_messages(image, history, question)
        encoded = server.pipe.processor.encode(images=images, messages=messages)
        room = server.engine.max_len - len(encoded.input_ids)
        cfg = server.pipe.generation_config(
            max_new_tokens=max(1, min(settings["max_tokens"], room)),
            temperature=settings["temperature"],
            top_p=settings["top_p"],
        )
        handle = server.engine.submit(encoded, cfg)
        text = ""
        try:
            for delta in handle:
                text += delta
                yield text
        finally:
            if handle.finish is None:
                handle.cancel()
        if not text:
            yield text

    return stream


def mount_ui(app, server, api_key: str | None = None, path: str = "/ui") -> None:
    import gradio as gr

    demo = build_ui(lambda: [server.name], engine_stream(server), title=f"llavakit — {server.name}")
    auth = (lambda _user, password: password == api_key) if api_key else None
    gr.mount_gradio_app(app, demo, path=path, auth=auth)
