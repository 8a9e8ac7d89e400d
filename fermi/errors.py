class FermiError(Exception):
    """An error meant for the user: its message is one readable line, no traceback."""


class ContextOverflow(FermiError):
    """The prompt (plus what must be generated) does not fit the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        super().__init__(
            f"prompt is {prompt_tokens} tokens but the model's context is {context_length} tokens"
        )
