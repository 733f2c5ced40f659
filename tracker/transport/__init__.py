"""The transport: Starlette endpoints (websockets and HTTP), the channel writer, and the one module
that knows uvicorn's private names (`uvicorn_fast`). It depends on the core, never the reverse."""
