"""Build the agent demo data: examples/data/agent_train.jsonl, agent_eval.jsonl and agent_tools.json.

Written for sftlab (CC0), deterministic (seeded). OpenAI fine-tuning rows over twelve tools
(strings, numbers, integers, enums, optional parameters): a user asks, the assistant calls the right tool with the arguments the user gave
(arguments as JSON strings, content null), the tool answers, the assistant answers from the
result. Some rows call two tools at once; some need no tool at all (the tools are offered, the
assistant answers directly). Each row offers the tool it needs and another one (two tools when
none is needed), in a shuffled order, so the model must pick by name and description.

The held-out rows (agent_eval.jsonl) end with the turn that is scored: the call (or the direct
answer). Half of them use tools that never appear in training (get_stock_price, translate_text,
book_table); the others use the training tools with argument values (cities, currencies,
amounts, dates) that never appear in training. tests/test_agent_demo_data.py checks both.

    python examples/data/make_agent_demo.py        # rewrites the three files
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def tool(name: str, description: str, **params) -> dict:
    required = [k for k, v in params.items() if not v.pop("optional", False)]
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": params, "required": required}}}


TRAIN_TOOLS = {
    "get_weather": tool("get_weather", "Current weather in a city.", city={"type": "string"},
                        unit={"type": "string", "enum": ["celsius", "fahrenheit"], "optional": True}),
    "convert_currency": tool("convert_currency", "Convert an amount between currencies (ISO codes).",
                             amount={"type": "number"}, from_currency={"type": "string"}, to_currency={"type": "string"}),
    "get_time": tool("get_time", "Local time in a city.", city={"type": "string"}),
    "search_flights": tool("search_flights", "Flights between two cities on a date (YYYY-MM-DD).",
                           origin={"type": "string"}, destination={"type": "string"}, date={"type": "string"}),
    "calculate": tool("calculate", "Evaluate an arithmetic expression.", expression={"type": "string"}),
    "create_reminder": tool("create_reminder", "Set a reminder at a time (HH:MM).", text={"type": "string"},
                            time={"type": "string"}),
}
TRAIN_TOOLS.update({
    "order_pizza": tool("order_pizza", "Order pizzas for delivery.", size={"type": "string", "enum": ["small", "medium", "large"]},
                        topping={"type": "string"}, quantity={"type": "integer"}),
    "get_news": tool("get_news", "The latest headlines on a topic.", topic={"type": "string"}, count={"type": "integer"}),
    "send_message": tool("send_message", "Send a text message to a contact.", recipient={"type": "string"},
                         text={"type": "string"}),
    "convert_units": tool("convert_units", "Convert a value between units of measure.", value={"type": "number"},
                          from_unit={"type": "string"}, to_unit={"type": "string"}),
    "get_population": tool("get_population", "Population of a country.", country={"type": "string"}),
    "play_music": tool("play_music", "Play music by an artist, optionally a number of songs.", artist={"type": "string"},
                       songs={"type": "integer", "optional": True}),
})
EVAL_TOOLS = {
    "get_stock_price": tool("get_stock_price", "Latest price of a stock by its ticker symbol.", symbol={"type": "string"}),
    "translate_text": tool("translate_text", "Translate text into a language.", text={"type": "string"},
                           target_language={"type": "string"}),
    "book_table": tool("book_table", "Book a restaurant table for a number of people at a time (HH:MM).",
                       restaurant={"type": "string"}, people={"type": "integer"}, time={"type": "string"}),
}

TRAIN_CITIES = ["Paris", "Oslo", "Lima", "Tokyo", "Cairo", "Madrid", "Toronto", "Nairobi", "Sydney", "Vienna",
                "Dublin", "Seoul", "Chicago", "Athens", "Lagos", "Hanoi", "Prague", "Denver", "Quito", "Helsinki"]
EVAL_CITIES = ["Lisbon", "Reykjavik", "Montevideo", "Kyoto", "Marrakesh", "Tallinn", "Perth", "Valparaiso", "Tbilisi",
               "Winnipeg"]
TRAIN_CURRENCIES = ["EUR", "USD", "JPY", "GBP", "CHF", "CAD", "SEK", "INR"]
EVAL_CURRENCIES = ["NZD", "BRL", "ZAR", "KRW"]
SKIES = ["sunny", "cloudy", "raining", "snowing", "windy", "foggy"]
TASKS = ["call the dentist", "water the plants", "send the report", "pick up the keys", "book the train",
         "stretch", "take the medicine", "pay the rent", "back up the laptop", "buy bread"]
EVAL_TASKS = ["renew the passport", "feed the cat", "return the library books"]

TOPPINGS = ["mushroom", "pepperoni", "olive", "cheese", "ham"]
NEWS_TOPICS = ["science", "sports", "music", "space", "farming", "chess"]
CONTACTS = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace"]
MESSAGES = ["I am running late", "see you at noon", "call me back", "the meeting moved to Friday", "happy birthday"]
UNIT_PAIRS = [("miles", "kilometers"), ("kilograms", "pounds"), ("liters", "gallons"), ("feet", "meters"),
              ("celsius", "fahrenheit")]
COUNTRIES = ["Norway", "Peru", "Japan", "Egypt", "Spain", "Canada", "Kenya", "Austria", "Ireland", "Vietnam"]
ARTISTS = ["Miles Davis", "Nina Simone", "Bach", "Queen", "Bob Marley", "Adele"]

DIRECT = [  # questions the offered tools do not help with: answered without a call
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Say hello in Spanish.", "Hola."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Name three primary colours.", "Red, yellow and blue."),
    ("How many days are in a week?", "A week has seven days."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Give me a synonym for happy.", "Joyful."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("Thank you!", "You're welcome!"),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is H2O?", "H2O is water."),
    ("Tell me a fun fact about octopuses.", "Octopuses have three hearts."),
    ("What do bees make?", "Bees make honey."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest."),
    ("Spell the word cat backwards.", "tac"),
    ("What is the plural of mouse?", "The plural of mouse is mice."),
    ("Is a tomato a fruit?", "Yes, botanically a tomato is a fruit."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("Name a fruit that is yellow.", "A banana."),
    ("What do you call a baby cat?", "A kitten."),
    ("Hello!", "Hello! How can I help you today?"),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is the first letter of the alphabet?", "A."),
    ("Which animal is known as the king of the jungle?", "The lion."),
    ("What is the chemical symbol for gold?", "Au."),
    ("Can you tell me a joke?", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the square of 3?", "9."),
    ("Who was the first person on the Moon?", "Neil Armstrong."),
    ("What does a thermometer measure?", "Temperature."),
    ("Goodbye!", "Goodbye! Have a nice day."),
]
EVAL_DIRECT = [
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many minutes are in an hour?", "An hour has sixty minutes."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("Name a mammal that can fly.", "The bat."),
    ("Good morning!", "Good morning! How can I help?"),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
]


def call(name: str, arguments: dict, index: int = 0) -> dict:
    return {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def offered(rng: random.Random, needed: list[str], pool: dict) -> list[dict]:
    others = [n for n in pool if n not in needed]
    names = needed + rng.sample(others, 1 if needed else 2)
    rng.shuffle(names)
    return [pool[n] for n in names]


def weather(rng, cities):
    city = rng.choice(cities)
    unit = rng.choice([None, None, "celsius", "fahrenheit"])
    ask = rng.choice(["What is the weather in {c}?", "How is the weather in {c} right now?", "Weather in {c}, please.",
                      "Is it cold in {c} today?"]).format(c=city)
    if unit:
        ask = ask.rstrip("?.") + f", in {unit}?"
    args = {"city": city, **({"unit": unit} if unit else {})}
    temp = rng.randint(-5, 35) if unit != "fahrenheit" else rng.randint(25, 95)
    sky = rng.choice(SKIES)
    result = {"city": city, "temperature": temp, "unit": unit or "celsius", "sky": sky}
    answer = f"It is {temp} degrees {'Fahrenheit' if unit == 'fahrenheit' else 'Celsius'} and {sky} in {city}."
    return "get_weather", ask, args, result, answer


def currency(rng, codes):
    amount = rng.choice([10, 25, 40, 75, 100, 150, 250, 300, 500, 1200])
    a, b = rng.sample(codes, 2)
    ask = rng.choice(["Convert {n} {a} to {b}.", "How much is {n} {a} in {b}?", "What are {n} {a} worth in {b}?"]).format(
        n=amount, a=a, b=b)
    value = round(amount * rng.uniform(0.2, 3.0), 2)
    return ("convert_currency", ask, {"amount": amount, "from_currency": a, "to_currency": b},
            {"amount": value, "currency": b}, f"{amount} {a} is about {value} {b}.")


def local_time(rng, cities):
    city = rng.choice(cities)
    ask = rng.choice(["What time is it in {c}?", "Tell me the local time in {c}.", "Current time in {c}?"]).format(c=city)
    hour, minute = rng.randint(0, 23), rng.choice([0, 5, 15, 20, 30, 45, 50])
    return "get_time", ask, {"city": city}, {"time": f"{hour:02d}:{minute:02d}"}, f"It is {hour:02d}:{minute:02d} in {city}."


def flights(rng, cities, year=2026):
    a, b = rng.sample(cities, 2)
    date = f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    ask = rng.choice(["Find flights from {a} to {b} on {d}.", "Are there flights from {a} to {b} on {d}?",
                      "Search flights {a} to {b}, {d}."]).format(a=a, b=b, d=date)
    count = rng.randint(0, 6)
    answer = (f"There are {count} flights from {a} to {b} on {date}." if count else f"No flights from {a} to {b} on {date}.")
    return ("search_flights", ask, {"origin": a, "destination": b, "date": date}, {"flights": count}, answer)


def arithmetic(rng, low=2, high=99):
    x, y = rng.randint(low, high), rng.randint(low, high)
    op = rng.choice(["+", "-", "*"])
    expression = f"{x} {op} {y}"
    value = eval(expression)  # noqa: S307 - the generator's own arithmetic
    ask = rng.choice(["What is {e}?", "Calculate {e}.", "Compute {e} for me."]).format(e=expression)
    return "calculate", ask, {"expression": expression}, {"result": value}, f"{expression} = {value}."


def reminder(rng, tasks):
    task = rng.choice(tasks)
    time = f"{rng.randint(6, 22):02d}:{rng.choice(['00', '15', '30', '45'])}"
    ask = rng.choice(["Remind me to {t} at {h}.", "Set a reminder at {h} to {t}.", "Please remind me at {h}: {t}."]).format(
        t=task, h=time)
    return ("create_reminder", ask, {"text": task, "time": time}, {"status": "set"},
            f"Done: I will remind you to {task} at {time}.")


def pizza(rng):
    size, topping, quantity = rng.choice(["small", "medium", "large"]), rng.choice(TOPPINGS), rng.randint(1, 5)
    ask = rng.choice(["Order {q} {s} {t} pizzas.", "I want {q} {s} pizzas with {t}.", "Get me {q} {s} {t} pizzas, please."]
                     ).format(q=quantity, s=size, t=topping)
    return ("order_pizza", ask, {"size": size, "topping": topping, "quantity": quantity}, {"order": "placed", "eta_minutes": 30},
            f"Your {quantity} {size} {topping} pizzas are ordered; they arrive in about 30 minutes.")


def news(rng):
    topic, count = rng.choice(NEWS_TOPICS), rng.randint(2, 5)
    ask = rng.choice(["Give me {n} headlines about {t}.", "What are the top {n} news stories on {t}?"]).format(n=count, t=topic)
    headlines = [f"{topic.title()} story {k + 1}" for k in range(count)]
    return ("get_news", ask, {"topic": topic, "count": count}, {"headlines": headlines},
            f"The top {count} {topic} headlines: " + "; ".join(headlines) + ".")


def message(rng):
    name, text = rng.choice(CONTACTS), rng.choice(MESSAGES)
    ask = rng.choice(["Text {n}: {m}", "Send {n} a message saying '{m}'.", "Tell {n} '{m}' by message."]).format(n=name, m=text)
    return ("send_message", ask, {"recipient": name, "text": text}, {"status": "sent"}, f"Sent to {name}.")


def units(rng):
    value, (a, b) = rng.choice([3, 5, 10, 12, 42, 100, 2.5]), rng.choice(UNIT_PAIRS)
    ask = rng.choice(["Convert {v} {a} to {b}.", "How many {b} is {v} {a}?"]).format(v=value, a=a, b=b)
    result = round(value * rng.uniform(0.3, 3), 2)
    return "convert_units", ask, {"value": value, "from_unit": a, "to_unit": b}, {"value": result}, f"{value} {a} is {result} {b}."


def population(rng):
    country = rng.choice(COUNTRIES)
    ask = rng.choice(["What is the population of {c}?", "How many people live in {c}?"]).format(c=country)
    people = rng.randint(1, 300) * 1_000_000
    return ("get_population", ask, {"country": country}, {"population": people},
            f"{country} has about {people // 1_000_000} million people.")


def music(rng):
    artist, songs = rng.choice(ARTISTS), rng.choice([None, 2, 3, 5])
    ask = f"Play {songs} songs by {artist}." if songs else rng.choice(["Play some {a}.", "Put on music by {a}."]).format(a=artist)
    return ("play_music", ask, {"artist": artist, **({"songs": songs} if songs else {})}, {"status": "playing"},
            f"Playing {artist}.")


def stock(rng):
    symbol = rng.choice(["AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "IBM"])
    ask = rng.choice(["What is the stock price of {s}?", "How much is {s} trading at?"]).format(s=symbol)
    return "get_stock_price", ask, {"symbol": symbol}


def translate(rng):
    text, lang = rng.choice([("good night", "French"), ("thank you", "German"), ("where is the station", "Italian"),
                             ("I like tea", "Spanish")])
    ask = rng.choice(["Translate '{t}' into {l}.", "How do you say '{t}' in {l}?"]).format(t=text, l=lang)
    return "translate_text", ask, {"text": text, "target_language": lang}


def table(rng):
    place = rng.choice(["Luigi's", "The Green Fork", "Sakura House", "Casa Mar"])
    people, time = rng.randint(2, 8), f"{rng.randint(18, 21):02d}:{rng.choice(['00', '30'])}"
    ask = f"Book a table at {place} for {people} people at {time}."
    return "book_table", ask, {"restaurant": place, "people": people, "time": time}


TRAIN_MAKERS = [lambda r: weather(r, TRAIN_CITIES), lambda r: currency(r, TRAIN_CURRENCIES),
                lambda r: local_time(r, TRAIN_CITIES), lambda r: flights(r, TRAIN_CITIES),
                lambda r: arithmetic(r), lambda r: reminder(r, TASKS), pizza, news, message, units, population, music]


def train_rows(rng: random.Random, calls: int = 240, parallel: int = 24, direct: int = 72) -> list[dict]:
    rows = []
    for k in range(calls):
        name, ask, args, result, answer = TRAIN_MAKERS[k % len(TRAIN_MAKERS)](rng)
        rows.append({"tools": offered(rng, [name], TRAIN_TOOLS), "messages": [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": None, "tool_calls": [call(name, args)]},
            {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(result)},
            {"role": "assistant", "content": answer}]})
    for _ in range(parallel):  # two cities at once: two calls in one turn
        a, b = rng.sample(TRAIN_CITIES, 2)
        one, two = weather(rng, [a]), weather(rng, [b])
        rows.append({"tools": offered(rng, ["get_weather"], TRAIN_TOOLS), "messages": [
            {"role": "user", "content": f"What is the weather in {a} and in {b}?"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": a}, 0),
                                                                   call("get_weather", {"city": b}, 1)]},
            {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(one[3])},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(two[3])},
            {"role": "assistant", "content": f"{one[4]} {two[4]}"}]})
    for k in range(direct):
        question, answer = DIRECT[k % len(DIRECT)]
        rows.append({"tools": offered(rng, [], TRAIN_TOOLS), "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    rng.shuffle(rows)
    return rows


def eval_rows(rng: random.Random) -> list[dict]:
    """The scored turn last: a call with the expected arguments, or a direct answer."""
    rows = []
    makers = [stock, translate, table] * 7 + [lambda r: weather(r, EVAL_CITIES)[:3], lambda r: currency(r, EVAL_CURRENCIES)[:3],
                                              lambda r: local_time(r, EVAL_CITIES)[:3],
                                              lambda r: flights(r, EVAL_CITIES, 2027)[:3],
                                              lambda r: arithmetic(r, 100, 999)[:3], lambda r: reminder(r, EVAL_TASKS)[:3]] * 4
    pool = {**TRAIN_TOOLS, **EVAL_TOOLS}
    for make in makers:
        name, ask, args = make(rng)
        rows.append({"tools": offered(rng, [name], pool), "messages": [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": None, "tool_calls": [call(name, args)]}]})
    for question, answer in EVAL_DIRECT * 2:
        rows.append({"tools": offered(rng, [], pool), "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def build() -> dict[str, str]:
    rng = random.Random(2026)
    train, held_out = train_rows(rng), eval_rows(random.Random(7))
    lines = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tools = json.dumps([*TRAIN_TOOLS.values(), *EVAL_TOOLS.values()], indent=1) + "\n"
    return {"agent_train.jsonl": lines(train), "agent_eval.jsonl": lines(held_out), "agent_tools.json": tools}


if __name__ == "__main__":
    for name, text in build().items():
        (HERE / name).write_text(text)
        print(f"{name}: {text.count(chr(10))} lines")
