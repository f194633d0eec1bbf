"""The OpenAI tool definitions the demo conversations offer the model.

`WEATHER_TOOL` is the weather example the README and the tests send (a `get_weather` function
with a required `location` and an optional `unit`); a few rewordings of it and some unrelated
tools make the tool lists of the training conversations vary.
"""

from __future__ import annotations

import copy
import random
from typing import Any

Tool = dict[str, Any]


def _function(name: str, description: str, properties: dict, required: list[str]) -> Tool:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


_UNIT = {"type": "string", "enum": ["celsius", "fahrenheit"]}

WEATHER_TOOL: Tool = _function(
    "get_weather",
    "Get the current weather in a given location",
    {
        "location": {"type": "string", "description": "The city, e.g. Beijing"},
        "unit": _UNIT,
    },
    ["location"],
)

_WEATHER_VARIANTS: tuple[Tool, ...] = (
    WEATHER_TOOL,
    _function(
        "get_weather",
        "Look up the weather for a city",
        {"location": {"type": "string"}, "unit": _UNIT},
        ["location"],
    ),
    _function(
        "get_weather",
        "Current temperature and conditions of a city",
        {
            "location": {"type": "string", "description": "City name"},
            "unit": {**_UNIT, "description": "Temperature unit"},
        },
        ["location"],
    ),
)

_OTHER_TOOLS: tuple[Tool, ...] = (
    _function(
        "get_time",
        "Get the current local time in a timezone",
        {"timezone": {"type": "string", "description": "IANA timezone, e.g. Asia/Shanghai"}},
        ["timezone"],
    ),
    _function(
        "search_web",
        "Search the web and return the top results",
        {"query": {"type": "string"}},
        ["query"],
    ),
    _function(
        "send_email",
        "Send an email",
        {
            "to": {"type": "string"},
            "subject": {"type": "string"},
            "body": {"type": "string"},
        },
        ["to", "subject", "body"],
    ),
    _function(
        "get_stock_price",
        "Latest price of a stock",
        {"symbol": {"type": "string", "description": "Ticker symbol"}},
        ["symbol"],
    ),
    _function(
        "convert_currency",
        "Convert an amount between currencies",
        {
            "amount": {"type": "number"},
            "from_currency": {"type": "string"},
            "to_currency": {"type": "string"},
        },
        ["amount", "from_currency", "to_currency"],
    ),
)


def tools_with_weather(rng: random.Random) -> list[Tool]:
    """A get_weather definition, alone or among up to two other tools, in random order."""
    weather = rng.choice(_WEATHER_VARIANTS) if rng.random() < 0.5 else WEATHER_TOOL
    tools = [weather, *rng.sample(_OTHER_TOOLS, rng.choice((0, 0, 0, 0, 1, 1, 1, 2)))]
    rng.shuffle(tools)
    return copy.deepcopy(tools)


def tools_without_weather(rng: random.Random) -> list[Tool]:
    """One or two tools, none of which can look up the weather."""
    return copy.deepcopy(rng.sample(_OTHER_TOOLS, rng.choice((1, 1, 2))))
