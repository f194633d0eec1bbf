"""Text side of the engine: tokenizer loading, chat prompts and streaming detokenization."""

from ernie_cluster.tokenizer.chat_template import ChatTemplateError, render_chat_template
from ernie_cluster.tokenizer.detokenizer import IncrementalDetokenizer
from ernie_cluster.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "Tokenizer",
    "load_tokenizer",
    "render_chat_template",
]
