"""Structured outputs: grammar-constrained decoding with xgrammar (JSON schemas, regexes,
choices, EBNF grammars and strict tool calls)."""
