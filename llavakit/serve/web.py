"""``llavakit web``: the Gradio front end of the controller / worker trio."""

from __future__ import annotations

from llavakit.serve.client import ControllerClient
from llavakit.serve.webui import build_ui, history_to_messages


def controller_stream(client: ControllerClient):
    def stream(model, image, history, question, settings):
        if not model:
            raise RuntimeError("no model selected (press 'Refresh models')")
        messages, images = history_to_messages(image, history, question)
        yield from client.stream(
            model,
            messages,
            images,
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            max_new_tokens=settings["max_tokens"],
        )

    return stream


def build_web(controller: str, side_by_side: bool = False):
    client = ControllerClient(controller)
    return build_ui(client.list_models, controller_stream(client), "llavakit", side_by_side)


def run_web(
    controller: str, host: str = "127.0.0.1", port: int = 7860, side_by_side: bool = False
) -> None:
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    app = gr.mount_gradio_app(FastAPI(), build_web(controller, side_by_side), path="/")
    print(f"llavakit: web UI on http://{host}:{port} (controller {controller})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
