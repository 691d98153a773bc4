"""gpt2lab: exact GPT-2 and its modern variants in plain PyTorch."""

from gpt2lab.config import GPTConfig
from gpt2lab.errors import CheckpointError, ConfigError, GPT2LabError
from gpt2lab.generate import generate, stream
from gpt2lab.model import GPT
from gpt2lab.tokenizer import load_tokenizer

__all__ = ["GPT", "GPTConfig", "GPT2LabError", "CheckpointError", "ConfigError", "generate", "stream", "load_tokenizer"]
__version__ = "0.1.0"
