"""Writes instructions-train.jsonl (211 rows) and instructions-test.jsonl (50 held-out rows).

Seven templated instruction families with one right, one-line answer each (capitals, opposites,
capital letters, the next letter, plurals, first letters, numbers in digits), shuffled with a
fixed seed. Run
it again to get the same files: python docs/examples/make_instructions.py
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Hungary": "Budapest",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Kenya": "Nairobi",
    "India": "New Delhi",
    "Thailand": "Bangkok",
    "South Korea": "Seoul",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Cuba": "Havana",
    "Australia": "Canberra",
    "Czech Republic": "Prague",
    "Romania": "Bucharest",
    "Ukraine": "Kyiv",
    "Vietnam": "Hanoi",
    "Colombia": "Bogota",
    "Iceland": "Reykjavik",
    "Scotland": "Edinburgh",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "high": "low",
    "old": "new",
    "rich": "poor",
    "hard": "soft",
    "long": "short",
    "strong": "weak",
    "wet": "dry",
    "thick": "thin",
    "loud": "quiet",
    "clean": "dirty",
    "easy": "difficult",
    "first": "last",
    "good": "bad",
    "heavy": "light",
    "inside": "outside",
    "left": "right",
    "love": "hate",
    "near": "far",
    "push": "pull",
    "true": "false",
    "win": "lose",
    "day": "night",
    "buy": "sell",
    "give": "take",
    "always": "never",
    "alive": "dead",
    "north": "south",
    "east": "west",
    "top": "bottom",
    "before": "after",
    "friend": "enemy",
}
WORDS = [
    "cat",
    "house",
    "river",
    "apple",
    "green",
    "window",
    "music",
    "table",
    "garden",
    "paper",
    "orange",
    "summer",
    "bread",
    "silver",
    "water",
    "mountain",
    "pencil",
    "coffee",
    "tiger",
    "cloud",
    "dance",
    "forest",
    "little",
    "yellow",
    "stone",
    "rocket",
    "candle",
    "winter",
    "basket",
    "planet",
    "doctor",
    "island",
    "honey",
    "jacket",
    "lemon",
    "mirror",
    "night",
    "ocean",
    "pepper",
    "rabbit",
]
PLURALS = {
    "cat": "cats",
    "dog": "dogs",
    "box": "boxes",
    "child": "children",
    "mouse": "mice",
    "tooth": "teeth",
    "foot": "feet",
    "man": "men",
    "woman": "women",
    "city": "cities",
    "baby": "babies",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "bus": "buses",
    "glass": "glasses",
    "church": "churches",
    "dish": "dishes",
    "goose": "geese",
    "person": "people",
    "book": "books",
    "tree": "trees",
    "car": "cars",
    "fox": "foxes",
    "story": "stories",
    "party": "parties",
    "wife": "wives",
    "life": "lives",
    "potato": "potatoes",
    "hero": "heroes",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "ox": "oxen",
    "cactus": "cacti",
    "house": "houses",
    "key": "keys",
    "boy": "boys",
    "toy": "toys",
    "watch": "watches",
}
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50}


def rows() -> list[dict]:
    out = []
    for country, city in CAPITALS.items():
        out.append((f"What is the capital of {country}?", city))
    for word, opposite in OPPOSITES.items():
        out.append((f'Give the opposite of the word "{word}".', opposite))
    for word in WORDS:
        out.append((f'Write "{word}" in capital letters.', word.upper()))
    letters = "abcdefghijklmnopqrstuvwxyz"
    for a, b in zip(letters, letters[1:]):
        out.append((f'Which letter comes after "{a}" in the alphabet?', b))
    for word, plural in PLURALS.items():
        out.append((f'What is the plural of "{word}"?', plural))
    for word in PLURALS:
        out.append((f'What is the first letter of the word "{word}"?', word[0]))
    for value, word in enumerate(NUMBERS):
        out.append((f"Write the number {word} in digits.", str(value)))
    for word, value in TENS.items():
        if word != "twenty":
            out.append((f"Write the number {word} in digits.", str(value)))
        for unit in ("one", "five", "eight"):
            out.append(
                (f"Write the number {word}-{unit} in digits.", str(value + NUMBERS.index(unit)))
            )
    return [{"instruction": q, "output": a} for q, a in out]


def main() -> None:
    data = rows()
    random.Random(0).shuffle(data)
    here = Path(__file__).parent
    for name, part in (("train", data[:-50]), ("test", data[-50:])):
        with open(here / f"instructions-{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    main()
