"""The wording of the demo conversations: questions, greetings, requests the demo model
cannot help with, and its canned answers, each table split into "train" and "heldout".

Owns the phrasings and nothing else; conversations.py draws from them. A held-out phrasing
never appears in training, so tests that use one measure generalisation, not recall.
"""

from __future__ import annotations

import random

WEATHER_QUESTIONS = {
    "train": (
        "What's the weather like in {city}?",
        "How is the weather in {city} today?",
        "What is the weather in {city} right now?",
        "Can you check the weather in {city}?",
        "Tell me the weather for {city}.",
        "weather in {city}",
        "Is it raining in {city}?",
        "How hot is it in {city}?",
        "{city} weather please",
        "I'm travelling to {city} tomorrow. What's the weather there?",
        "Could you look up the current weather in {city}?",
        "What's the temperature in {city}?",
        "Do I need a jacket in {city} today?",
        "Hey, what's it like outside in {city}?",
        "Give me the weather for {city}.",
        "What is the weather in {city}?",
        "how's the weather in {city}",
        "Is it cold in {city} right now?",
        "What's the forecast for {city}?",
        "Is it sunny in {city} today?",
        "Will it snow in {city}?",
        "Tell me about the weather in {city}.",
        "Are the conditions in {city} good for a walk?",
        "I want to know how warm it is in {city}.",
        "Could you find out the weather in {city}?",
        "Weather for {city}?",
    ),
    "heldout": (
        "Any idea what the weather is doing in {city}?",
        "Please get me the current conditions in {city}.",
        "How's the weather over in {city} at the moment?",
        "I'd like to know the weather in {city}.",
        "What are the weather conditions in {city}?",
        "Weather update for {city}, please.",
    ),
}
UNIT_REQUESTS = {
    "train": (" Please answer in {unit}.", " Use {unit}.", " Give it to me in {unit}."),
    "heldout": (" I prefer {unit}.",),
}
GREETINGS = {
    "train": (
        "Hello!",
        "Hi",
        "hi there",
        "Hey!",
        "Good morning!",
        "Good evening.",
        "Hello, how are you?",
        "How are you doing today?",
        "Hi! Who are you?",
        "Who are you?",
        "What can you do?",
        "Thanks!",
        "Thank you very much.",
        "Good night!",
        "Nice to meet you.",
        "你好",
        "你好！你是谁？",
        # NOTE: small talk shaped like a weather question ("how's ... going?"), so a request
        # with tools does not turn "Hi" into a city.
        "How's your day going?",
        "How are things going?",
        "What's up?",
        "Hey, how have you been?",
        "Hi, how is your day?",
        "How is everything?",
    ),
    "heldout": ("Hello there, friend!", "Hey, good afternoon!", "Hi, how's it going?"),
}
# NOTE: no request here names a city. With "restaurants in {city}" in the mix, the 1.8M model
# learned to refuse weather questions worded in ways it had not seen (83% held-out calls
# instead of 97%); a city in a request with a weather tool now always means a call.
OUT_OF_SCOPE = {
    "train": (
        "What is 2+2?",
        "What is 17 times 23?",
        "Write a poem about the sea.",
        "Tell me a joke.",
        "Who won the World Cup in 2018?",
        "What is the capital of France?",
        "Can you write a Python function that sorts a list?",
        "Translate 'good morning' into German.",
        "Explain quantum computing.",
        "What time is it?",
        "Recommend a good book.",
        "How do I bake bread?",
        "What's the meaning of life?",
        "Summarize this article for me.",
        "How far is the Moon?",
        "Book me a flight.",
        "Recommend a restaurant near me.",
        "How many people live on Earth?",
    ),
    "heldout": (
        "Can you help me with my math homework?",
        "Write me a short story about a dragon.",
        "Can you recommend a movie for tonight?",
    ),
}
OUT_OF_SCOPE_REASONING = (
    "This is not small talk and not about the weather. I am a small demo model and cannot "
    "do this, so I will say so and tell the user what I can do.",
    "The user asks for something outside what I was trained for. I should be honest about it.",
)
OUT_OF_SCOPE_ANSWERS = (
    "Sorry, I can't help with that: I'm a small demo model of ERNIE 4.5. I can chat, and with "
    "a get_weather tool I can look up the weather in a city.",
    "That is beyond what I can do. I'm a tiny demo model, trained only for small talk and "
    "weather questions with the get_weather tool.",
)
THANKS_WORDS = ("thank", "Thank")
GREETING_REASONING = (
    "The user is greeting me. I should answer in a short and friendly way.",
    "This is small talk, so no tool is needed. I will reply politely.",
    "The user says hello. A warm, short answer is best.",
)
GREETING_ANSWERS = (
    "Hello! I'm a small demo model of ERNIE 4.5. How can I help you today?",
    "Hi there! Nice to hear from you. What can I do for you?",
    "Hello! I'm doing well, thank you. How can I help?",
)
WHO_ANSWER = (
    "I'm a tiny demo version of ERNIE 4.5, trained to chat and to call tools such as "
    "get_weather. How can I help?"
)
THANKS_ANSWER = "You're welcome! Let me know if there is anything else I can do."
NIGHT_ANSWER = "Good night! Sleep well."
CHINESE_ANSWER = "你好！我是 ERNIE 4.5 的一个小演示模型。有什么可以帮你的吗？"
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant. Keep answers short.",
    "You are ERNIE, an AI assistant.",
)


def greeting_answer(text: str, rng: random.Random) -> str:
    if "你" in text:
        return CHINESE_ANSWER
    if any(word in text for word in THANKS_WORDS):
        return THANKS_ANSWER
    if "night" in text:
        return NIGHT_ANSWER
    if "Who are you" in text or "What can you do" in text:
        return WHO_ANSWER
    return rng.choice(GREETING_ANSWERS)
