"""The serving core: requests, the scheduler over one KV cache of N slots,
output processors, records. No HTTP, no terminal, no tensors: every front door
(`fermi run`, `fermi chat`, `fermi serve`) submits requests and reads records."""

from .loop import DEFAULT_TTL_MS, EngineThread, Limits, default_slots
from .records import Delta, Done, ToolCall
from .request import QueueFull, Request, ShuttingDown, TokenMask
from .scheduler import Scheduler

__all__ = ["DEFAULT_TTL_MS", "Delta", "Done", "EngineThread", "Limits", "QueueFull", "Request", "Scheduler",
           "ShuttingDown", "TokenMask", "ToolCall", "default_slots"]
