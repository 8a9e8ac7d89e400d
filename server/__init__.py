"""`fermi serve`'s OpenAI-compatible HTTP server (Litestar): chat completions,
Responses, models and health. Start with `fermi.server.app.create_app()`."""
