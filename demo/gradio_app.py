"""A chat page on fermi's gRPC service: the answer streams in, the thinking trace
sits in a collapsible block above it, thinking is on, off or auto per message,
Reset starts a new session, and each answer ends with its usage line.

    pip install -e '.[demo]'
    fermi serve --grpc-port 50051 &
    python demo/gradio_app.py --grpc 127.0.0.1:50051      # then open http://127.0.0.1:7860

The conversation lives on the server (its session): the page sends only the new
message, and the server's KV cache keeps the history's prefix. --api-key (or
$FERMI_API_KEY) is sent as `authorization: Bearer …` metadata."""

from __future__ import annotations

import argparse
import os

import gradio as gr
import grpc

from fermi.server.rpc import fermi_pb2 as pb
from fermi.server.rpc import fermi_pb2_grpc as pb_grpc

THINKING = {"auto": pb.THINKING_AUTO, "on": pb.THINKING_ON, "off": pb.THINKING_OFF}
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class Client:
    def __init__(self, target: str, api_key: str | None = None, model: str = ""):
        self.stub = pb_grpc.FermiStub(grpc.insecure_channel(target))
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
        self.model = model

    def turn(self, session_id: str, prompt: str, thinking: str, max_new_tokens: int):
        """The server's responses for the next message of the session ("": a new one)."""
        request = pb.GenerateRequest(session_id=session_id, prompt=prompt, thinking=THINKING[thinking],
                                     max_new_tokens=max_new_tokens, model=self.model)
        return self.stub.Generate(request, metadata=self.metadata)

    def close(self, session_id: str) -> None:
        try:
            self.stub.CloseSession(pb.SessionRequest(session_id=session_id), metadata=self.metadata)
        except grpc.RpcError:  # gone already (expired, evicted): nothing to close
            pass


def usage_line(r: pb.GenerateResponse) -> str:
    u = r.usage
    return (f"{u.prompt_tokens} prompt tokens ({u.cached_tokens} cached) · {u.completion_tokens} generated · "
            f"first token {u.time_to_first_token_s:.2f} s · {u.tokens_per_second:.1f} tok/s · "
            f"{FINISH.get(r.finish_reason, '?')} · session {r.session_id}")


def build(client: Client, max_new_tokens: int = 1024) -> gr.Blocks:
    def send(message: str, history: list, thinking: str, session_id: str):
        """Streams (the box, the chat, the usage line, the session)."""
        history = list(history or [])
        if not message.strip():
            yield "", history, "type a message first", session_id
            return
        history.append({"role": "user", "content": message})
        trace = {"role": "assistant", "content": "", "metadata": {"title": "Thinking", "status": "pending"}}
        answer = {"role": "assistant", "content": ""}
        status = "…"
        try:
            for r in client.turn(session_id, message, thinking, max_new_tokens):
                session_id = r.session_id
                if r.finish_reason:
                    status = usage_line(r)
                elif r.kind == pb.KIND_REASONING:
                    trace["content"] += r.token
                else:
                    trace["metadata"]["status"] = "done"
                    answer["content"] += r.token
                shown = ([trace] if trace["content"] else []) + [answer]
                yield "", history + shown, status, session_id
        except grpc.RpcError as e:
            status = f"error: {e.details()} ({e.code().name})"
        trace["metadata"]["status"] = "done"
        history += ([trace] if trace["content"] else []) + [answer]
        yield "", history, status, session_id

    def reset(session_id: str):
        if session_id:
            client.close(session_id)
        return [], "new session", ""

    with gr.Blocks(title="fermi", analytics_enabled=False) as page:
        gr.Markdown("### fermi · chat over gRPC")
        chat = gr.Chatbot(label="conversation", height=480)
        with gr.Row():
            box = gr.Textbox(placeholder="Message (Enter sends)", show_label=False, scale=6)
            send_button = gr.Button("Send", variant="primary", scale=1)
        with gr.Row():
            thinking = gr.Radio(["auto", "on", "off"], value="auto", label="thinking")
            reset_button = gr.Button("Reset (new session)")
        usage = gr.Markdown("new session")
        session = gr.State("")
        io = dict(fn=send, inputs=[box, chat, thinking, session], outputs=[box, chat, usage, session])
        send_button.click(**io, api_name="send")
        box.submit(**io, api_visibility="private")
        reset_button.click(reset, inputs=[session], outputs=[chat, usage, session], api_name="reset")
    return page


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grpc", default="127.0.0.1:50051", help="the fermi gRPC service (default 127.0.0.1:50051)")
    p.add_argument("--api-key", default=os.environ.get("FERMI_API_KEY"), help="default: $FERMI_API_KEY")
    p.add_argument("--model", default="", help="the model of new sessions (default: the server's)")
    p.add_argument("--host", default="127.0.0.1", help="where the page listens (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    args = p.parse_args()
    page = build(Client(args.grpc, args.api_key, args.model), args.max_new_tokens)
    page.queue().launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
