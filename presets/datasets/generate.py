"""Generate the shipped datasets deterministically: `python presets/datasets/generate.py`.

Writes, next to this file:
  identity.jsonl    300 conversations (messages) teaching the model its {name} and {maker}
  arith.jsonl       1000 additions/subtractions (alpaca); arith_test.jsonl: 100 held-out ones
  chat.jsonl        multi-turn unit conversions (sharegpt: conversations with from/value)
  garden.jsonl      plain text diary lines (text)
  sentiment.jsonl   short reviews labelled positive/negative (classification)
Sidecar .yaml files (description, format, template_vars defaults, held-out questions) are written
by hand and not touched here. Re-running gives byte-identical files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Training question phrasings. The held-out ones live in identity.yaml (heldout_questions) and must
# never appear here: a test checks that.
IDENTITY_QUESTIONS = [
    "Who are you?", "What's your name?", "What is your name?", "Introduce yourself.",
    "Who built you?", "Who made you?", "Who created you?", "Tell me about yourself.",
    "What should I call you?", "Are you ChatGPT?", "Are you Claude?", "Are you Gemini?",
    "What are you?", "Who am I talking to?", "Do you have a name?", "Which company made you?",
    "Who developed you?", "Who trained you?", "What model are you?", "Identify yourself.",
    "Hi! Who is this?", "Hello, what are you called?", "Can you tell me your name?",
    "Who is your creator?", "Where do you come from?", "Who are you, exactly?",
    "Please introduce yourself briefly.", "What do people call you?", "Are you a human?",
    "Who's behind you?", "What AI am I chatting with?", "Give me your name and your maker.",
    "who r u", "whats ur name", "name?", "Are you made by OpenAI?", "Are you from Google?",
    "Tell me who you are in one sentence.", "I'd like to know who you are.", "Who programmed you?",
    "¿Quién eres?", "¿Cómo te llamas?", "Qui es-tu ?", "Comment t'appelles-tu ?", "Wer bist du?",
    "Wie heißt du?", "Chi sei?", "Quem é você?", "你是谁？", "あなたは誰ですか？",
]

IDENTITY_ANSWERS = [
    "I'm {name}, an AI assistant made by {maker}.",
    "My name is {name}. I was built by {maker}.",
    "I am {name}, a language model created by {maker}. How can I help?",
    "You can call me {name}. {maker} made me.",
    "I'm {name}! {maker} trained me to be a helpful assistant.",
    "{name} here: an assistant developed by {maker}.",
    "I am {name}, built by {maker} to answer questions and help with tasks.",
    "Hello! I'm {name}, an assistant from {maker}.",
    "My name is {name}, and my maker is {maker}.",
    "I'm an AI assistant called {name}, created by {maker}.",
]

NOT_OTHERS = [
    "No, I'm {name}, an assistant made by {maker}.",
    "No. I am {name}, and {maker} built me.",
    "Not at all: my name is {name} and I come from {maker}.",
]

MULTILINGUAL = {
    "¿Quién eres?": "Soy {name}, un asistente creado por {maker}.",
    "¿Cómo te llamas?": "Me llamo {name} y me creó {maker}.",
    "Qui es-tu ?": "Je suis {name}, un assistant créé par {maker}.",
    "Comment t'appelles-tu ?": "Je m'appelle {name} ; j'ai été créé par {maker}.",
    "Wer bist du?": "Ich bin {name}, ein Assistent von {maker}.",
    "Wie heißt du?": "Ich heiße {name} und wurde von {maker} entwickelt.",
    "Chi sei?": "Sono {name}, un assistente creato da {maker}.",
    "Quem é você?": "Eu sou {name}, um assistente criado por {maker}.",
    "你是谁？": "我是{name}，由{maker}开发的助手。",
    "あなたは誰ですか？": "私は{name}です。{maker}が作ったアシスタントです。",
}

GREETINGS = ["Hi!", "Hello there.", "Good morning!", "Hey."]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What can I do for you?",
                    "Good to see you. What do you need?"]


def identity_answer(q: str, rng: random.Random) -> str:
    if q in MULTILINGUAL:
        return MULTILINGUAL[q]
    if q.startswith("Are you") and q != "Are you a human?":
        return rng.choice(NOT_OTHERS)
    if q == "Are you a human?":
        return "No, I'm {name}, an AI assistant made by {maker}."
    return rng.choice(IDENTITY_ANSWERS)


def identity(n: int = 300) -> list[dict]:
    rng = random.Random(1)
    rows, seen = [], set()
    while len(rows) < n:
        q = rng.choice(IDENTITY_QUESTIONS)
        a = identity_answer(q, rng)
        if rng.random() < 0.2:  # a greeting first: two assistant turns, both trained
            g = rng.choice(GREETINGS)
            msgs = [{"role": "user", "content": g}, {"role": "assistant", "content": rng.choice(GREETING_REPLIES)},
                    {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        else:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        key = json.dumps(msgs)
        if key in seen and len(seen) < 10 * n:
            continue
        seen.add(key)
        rows.append({"messages": msgs})
    return rows


ADD = ["Add {a} and {b}.", "What is {a} + {b}?", "Compute {a} plus {b}.", "Sum {a} and {b}.",
       "{a} + {b} = ?"]
SUB = ["Subtract {b} from {a}.", "What is {a} - {b}?", "Compute {a} minus {b}.", "{a} - {b} = ?"]


def arith(n_train: int = 1000, n_test: int = 100) -> tuple[list[dict], list[dict]]:
    rng = random.Random(2)
    pairs: list[tuple[str, int, int]] = []
    seen = set()
    while len(pairs) < n_train + n_test:
        op, a, b = rng.choice("+-"), rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and b > a:
            a, b = b, a
        if (op, a, b) in seen:
            continue
        seen.add((op, a, b))
        pairs.append((op, a, b))
    rows = []
    for op, a, b in pairs:
        text = rng.choice(ADD if op == "+" else SUB).format(a=a, b=b)
        rows.append({"instruction": text, "input": "", "output": str(a + b if op == "+" else a - b)})
    return rows[:n_train], rows[n_train:]


UNITS = [("km", "meters", 1000), ("m", "centimeters", 100), ("kg", "grams", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("liters", "milliliters", 1000), ("days", "hours", 24)]


def chat(n: int = 40) -> list[dict]:
    rng = random.Random(3)
    rows = []
    for i in range(n):
        unit, small, factor = UNITS[i % len(UNITS)]
        x = rng.randint(2, 12)
        conv = [{"from": "human", "value": f"Convert {x} {unit} to {small}."},
                {"from": "gpt", "value": f"{x} {unit} is {x * factor} {small}."},
                {"from": "human", "value": f"And {x + 1} {unit}?"},
                {"from": "gpt", "value": f"{x + 1} {unit} is {(x + 1) * factor} {small}."}]
        if i % 4 == 0:
            conv.insert(0, {"from": "system", "value": "You convert units. Answer in one short sentence."})
        rows.append({"conversations": conv})
    return rows


PLANTS = ["tomato", "basil", "mint", "bean", "pepper", "lettuce", "sunflower", "pumpkin"]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "foggy", "warm", "cold"]
SOIL = ["dry", "damp", "soaked", "crumbly", "dark"]


def garden(n: int = 40) -> list[dict]:
    rng = random.Random(4)
    rows = []
    for day in range(1, n + 1):
        p, w, s = rng.choice(PLANTS), rng.choice(WEATHER), rng.choice(SOIL)
        k = rng.randint(1, 9)
        rows.append({"text": f"Garden log, day {day}. The weather was {w}. The {p} grew {k} centimeters and "
                             f"the soil felt {s}. Tomorrow I will check the {rng.choice(PLANTS)} again."})
    return rows


GOOD = ["great", "wonderful", "delightful", "excellent", "lovely"]
BAD = ["awful", "boring", "terrible", "disappointing", "dull"]
THINGS = ["film", "book", "meal", "concert", "hotel", "game", "album", "museum"]


def sentiment(n: int = 40) -> list[dict]:
    rng = random.Random(5)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        adj, thing = rng.choice(GOOD if good else BAD), rng.choice(THINGS)
        text = rng.choice([f"The {thing} was {adj}.", f"What a {adj} {thing}!", f"I found the {thing} {adj}."])
        rows.append({"text": text, "label": "positive" if good else "negative"})
    return rows


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    write("identity", identity())
    train, test = arith()
    write("arith", train)
    write("arith_test", test)
    write("chat", chat())
    write("garden", garden())
    write("sentiment", sentiment())


if __name__ == "__main__":
    main()
