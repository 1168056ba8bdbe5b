"""PEFT Studio: the page. `python app.py [--port N] [--workspace DIR] [--listen | --share] [--auth user:password]`.

Builds the Gradio Blocks from components/ and launches it on 127.0.0.1:7860 by default. Listening on all
interfaces (--listen) or through a share link (--share) needs a password (--auth or STUDIO_AUTH).
"""
from __future__ import annotations

import argparse
import os


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description="PEFT Studio web page")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--workspace", default="workspace", help="folder for runs, uploads and exports (default ./workspace)")
    p.add_argument("--listen", action="store_true", help="listen on all interfaces (0.0.0.0); needs --auth")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link; needs --auth")
    p.add_argument("--auth", default=os.environ.get("STUDIO_AUTH"), help="user:password (or env STUDIO_AUTH)")
    args = p.parse_args(argv)
    if args.auth is not None and (":" not in args.auth or not all(args.auth.split(":", 1))):
        p.error("--auth must look like user:password")
    if (args.listen or args.share) and not args.auth:
        p.error("--listen and --share expose the studio beyond this machine; add --auth user:password "
                "(or set STUDIO_AUTH) so nobody else can train or read your runs")
    return args


def build(workspace: str):
    import gradio as gr

    from components import HEADER, create_calculator, create_chat, create_export, create_runs, create_train, state
    state.init(workspace)
    with gr.Blocks(title="PEFT Studio") as demo:
        gr.HTML(HEADER)
        with gr.Tabs():
            train = create_train()
            create_runs(train["form"])
            create_chat()
            create_calculator()
            create_export()
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from components import CSS, state, theme
    demo = build(args.workspace)
    demo.queue(default_concurrency_limit=4).launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port, share=args.share,
        auth=tuple(args.auth.split(":", 1)) if args.auth else None, theme=theme(), css=CSS,
        allowed_paths=[str(state.ws().exports)], footer_links=["settings"])


if __name__ == "__main__":
    main()
