"""The project's own small English corpus, BPE vocabulary and `.bin/.idx` files (examples/gpt/data/).

    python -m mindtron.data.example_corpus                       # regenerate examples/gpt/data/
    python -m mindtron.data.example_corpus --output-dir /tmp/d --num-documents 200

Everything is generated here, nothing is downloaded: short documents (stories, letters, dialogues, animal
facts, recipes, market and weather reports) are assembled from templates and word lists written for this
project, with a fixed seed, so the text is readable, varied enough to learn from, and license-clean. Then a
byte-level BPE vocabulary is trained on it (`bpe_train`), and the corpus is tokenised with the project's
Megatron-compatible preprocessing (`preprocess`) into `corpus_text_document.bin/.idx`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from typing import Callable, List

NAMES = ["Ada", "Ben", "Clara", "Daniel", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo",
         "Maya", "Nils", "Olivia", "Pablo", "Quinn", "Rosa", "Samuel", "Tara", "Umar", "Vera", "Walter", "Xenia",
         "Yusuf", "Zoe", "Martha", "Oscar", "Lena", "Theo", "Nora", "Victor", "Alma", "Milo", "June", "Arthur"]
PROFESSIONS = ["baker", "farmer", "teacher", "sailor", "doctor", "painter", "carpenter", "gardener", "miller",
               "fisher", "librarian", "blacksmith", "potter", "shepherd", "weaver", "mechanic", "nurse", "cook",
               "musician", "builder", "clockmaker", "beekeeper", "postman", "tailor"]
PLACES = ["market", "harbor", "library", "bakery", "old mill", "river bank", "village square", "school",
          "train station", "orchard", "lighthouse", "forest path", "town hall", "bridge", "garden", "workshop",
          "hill", "meadow", "inn", "museum", "post office", "lake", "farm", "church tower", "clock tower"]
ANIMALS = [("fox", "forests and fields", "mice, berries and insects", 8),
           ("owl", "old trees and barns", "mice and beetles", 2),
           ("otter", "rivers and lakes", "fish and crabs", 12),
           ("badger", "woods and hedges", "worms, roots and fruit", 14),
           ("heron", "marshes and river banks", "fish and frogs", 2),
           ("hedgehog", "gardens and hedges", "snails and beetles", 1),
           ("deer", "forests and meadows", "grass, leaves and acorns", 90),
           ("hare", "open fields", "grass and herbs", 5),
           ("seal", "rocky coasts", "fish and squid", 150),
           ("beaver", "streams and ponds", "bark and water plants", 30),
           ("swan", "lakes and slow rivers", "water plants and grain", 12),
           ("wolf", "mountains and large forests", "deer and smaller animals", 60),
           ("squirrel", "parks and woods", "nuts, seeds and buds", 1),
           ("goat", "hills and farms", "grass, shrubs and leaves", 70),
           ("bee", "meadows and gardens", "nectar and pollen", 0)]
FOODS = ["bread", "apple pie", "vegetable soup", "pancakes", "cheese", "honey cake", "rice", "fish stew",
         "porridge", "plum jam", "roasted potatoes", "bean salad", "onion tart", "pear juice", "biscuits"]
INGREDIENTS = ["flour", "sugar", "butter", "milk", "eggs", "salt", "honey", "apples", "carrots", "onions",
               "oats", "beans", "potatoes", "pears", "cream", "water", "yeast", "cinnamon"]
GOODS = ["apples", "potatoes", "wool", "cheese", "eggs", "fish", "timber", "honey", "flour", "candles",
         "pears", "cabbages", "rope", "nails"]
ADJECTIVES = ["quiet", "busy", "bright", "cold", "warm", "old", "small", "large", "friendly", "tired", "happy",
              "careful", "curious", "patient", "brave", "gentle", "noisy", "windy", "green", "golden", "narrow",
              "wide", "sleepy", "clever", "calm", "heavy", "light", "early", "late", "strange"]
OBJECTS = ["a basket of apples", "an old map", "a blue umbrella", "a wooden box", "a letter", "a lantern",
           "a loaf of bread", "a bag of seeds", "a small bell", "a red scarf", "a fishing net", "a book of songs",
           "a broken clock", "a jar of honey", "a new hammer", "a pair of boots", "a kite", "a tin of paint",
           "a bunch of flowers", "a silver key"]
WEATHER = ["sunny", "rainy", "foggy", "windy", "cloudy", "snowy", "clear", "stormy", "mild", "frosty"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TIMES = ["in the morning", "at noon", "in the afternoon", "in the evening", "at dawn", "after dinner",
         "before breakfast", "late at night"]
SUPERLATIVES = ["best", "longest", "strangest", "quietest", "happiest"]
FEELINGS = ["glad", "surprised", "worried", "proud", "relieved", "excited", "sad", "amused", "puzzled"]
VERBS = ["found", "carried", "repaired", "painted", "sold", "bought", "lost", "opened", "cleaned", "built",
         "borrowed", "returned", "wrapped", "counted", "measured", "delivered"]
QUESTIONS = ["Where are you going?", "Have you seen my dog?", "What time is it?", "Is the market open today?",
             "Can you help me with this?", "Why is the bridge closed?", "Did you hear the news?",
             "How much are the apples?", "Who left the gate open?", "Shall we walk to the lake?"]
ANSWERS = ["I'm going to the {place}.", "I haven't seen him since {day}.", "It's almost {hour} o'clock.",
           "Yes, it opens at {hour}.", "Of course, I'll help you.", "They're repairing it, I think.",
           "No, what happened?", "They cost {n} coins a basket.", "I don't know, it wasn't me.",
           "Yes, let's go before it gets dark."]


class _Writer:
    """Fills templates from the word lists with one random generator."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def pick(self, items):
        return self.r.choice(items)

    def n(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def a(self, words: str) -> str:
        """`words` with its indefinite article."""
        return ("an " if words[0] in "aeiou" else "a ") + words

    def name(self) -> str:
        return self.pick(NAMES)

    def person(self) -> str:
        return f"{self.name()} the {self.pick(PROFESSIONS)}"

    # -- document kinds --------------------------------------------------------------------------------
    def story(self) -> str:
        hero, friend = self.name(), self.name()
        job, place = self.pick(PROFESSIONS), self.pick(PLACES)
        lines = [f"On a {self.pick(WEATHER)} {self.pick(DAYS)} {self.pick(TIMES)}, {hero} the {job} walked to "
                 f"the {place}."]
        for _ in range(self.n(3, 7)):
            lines.append(self.pick([
                lambda: f"There {hero} {self.pick(VERBS)} {self.pick(OBJECTS)}.",
                lambda: f"The {place} was {self.pick(ADJECTIVES)} and {self.pick(ADJECTIVES)}.",
                lambda: f"{friend} was waiting near the {self.pick(PLACES)} with {self.pick(OBJECTS)}.",
                lambda: f"\"It's {self.a(self.pick(ADJECTIVES))} day,\" said {friend}.",
                lambda: f"{hero} felt {self.pick(FEELINGS)}, because {self.pick(OBJECTS)} had been "
                        f"{self.pick(VERBS)} by someone else.",
                lambda: f"They didn't stay long; the {self.pick(WEATHER)} weather made the road "
                        f"{self.pick(ADJECTIVES)}.",
                lambda: f"After {self.n(2, 40)} minutes, {hero} {self.pick(VERBS)} {self.pick(OBJECTS)} "
                        f"for {friend}.",
                lambda: f"{self.a(self.pick(ADJECTIVES)).capitalize()} {self.pick(ANIMALS)[0]} watched them from the "
                        f"{self.pick(PLACES)}.",
            ])())
        lines.append(self.pick([f"In the end, {hero} went home {self.pick(FEELINGS)}.",
                                f"That evening {hero} and {friend} ate {self.pick(FOODS)} together.",
                                f"It was the {self.pick(SUPERLATIVES)} day of the "
                                f"month, or so {friend} said."]))
        return " ".join(lines)

    def letter(self) -> str:
        to, sender = self.name(), self.name()
        lines = [f"Dear {to},", "",
                 f"I'm writing to you from the {self.pick(PLACES)} on this {self.pick(WEATHER)} {self.pick(DAYS)}."]
        for _ in range(self.n(2, 5)):
            lines.append(self.pick([
                lambda: f"We've had {self.n(2, 9)} {self.pick(WEATHER)} days in a row, and the {self.pick(PLACES)} "
                        f"is {self.pick(ADJECTIVES)} again.",
                lambda: f"{self.person()} {self.pick(VERBS)} {self.pick(OBJECTS)} last week.",
                lambda: f"I'll visit you in {self.pick(MONTHS)} if the roads aren't too {self.pick(ADJECTIVES)}.",
                lambda: f"Don't forget to bring {self.pick(OBJECTS)} when you come.",
                lambda: f"The {self.pick(FOODS)} you sent was {self.pick(['wonderful', 'delicious', 'lovely'])}.",
                lambda: f"You'd laugh if you saw the {self.pick(ANIMALS)[0]} that lives behind our "
                        f"{self.pick(PLACES)}.",
            ])())
        lines += ["", f"Yours, {sender}"]
        return "\n".join(lines)

    def dialogue(self) -> str:
        a, b = self.name(), self.name()
        lines = []
        for _ in range(self.n(2, 5)):
            k = self.n(0, len(QUESTIONS) - 1)
            answer = ANSWERS[k].format(place=self.pick(PLACES), day=self.pick(DAYS), hour=self.n(1, 12),
                                       n=self.n(2, 30))
            lines.append(f"\"{QUESTIONS[k]}\" asked {a}.")
            if answer.endswith("."):
                answer = answer[:-1] + ","
            lines.append(f"\"{answer}\" said {b}.")
            a, b = b, a
        return "\n".join(lines)

    def animal(self) -> str:
        name, home, food, weight = self.pick(ANIMALS)
        lines = [f"The {name} is {self.a(self.pick(ADJECTIVES))} animal that lives in {home}.",
                 f"It eats {food}."]
        if weight:
            lines.append(f"An adult {name} can weigh up to {weight} kilograms.")
        else:
            lines.append(f"A single {name} weighs less than one gram.")
        lines.append(self.pick([f"Most {name}s are active {self.pick(TIMES)}.",
                                f"In {self.pick(MONTHS)} the young {name}s leave their parents.",
                                f"A {name} can live for about {self.n(2, 20)} years.",
                                f"People often see the {name} near the {self.pick(PLACES)}."]))
        return " ".join(lines)

    def recipe(self) -> str:
        dish = self.pick(FOODS)
        items = self.r.sample(INGREDIENTS, self.n(3, 6))
        amounts = [f"{self.n(1, 4)} {self.pick(['cups', 'spoons', 'handfuls', 'pinches'])} of {x}" for x in items]
        steps = [f"To make {dish} for {self.n(2, 8)} people, you'll need " + ", ".join(amounts[:-1])
                 + f" and {amounts[-1]}.",
                 f"First, mix the {items[0]} and the {items[1]} in a {self.pick(['large', 'small', 'deep'])} bowl.",
                 f"Then add the {items[2]} and stir for {self.n(2, 10)} minutes.",
                 f"Cook it for {self.n(10, 60)} minutes at {self.pick([160, 180, 200, 220])} degrees.",
                 self.pick(["Serve it warm.", "Let it cool before serving.", "It's best with a cup of tea.",
                            "Don't open the oven too early!"])]
        return " ".join(steps)

    def report(self) -> str:
        if self.n(0, 1):
            day, month = self.n(1, 28), self.pick(MONTHS)
            lines = [f"Market report for {self.pick(DAYS)}, {day} {month}."]
            for good in self.r.sample(GOODS, self.n(3, 5)):
                change = self.n(-15, 20)
                trend = "rose" if change > 0 else ("fell" if change < 0 else "stayed")
                lines.append(f"The price of {good} {trend}" + (f" by {abs(change)}%" if change else " the same")
                             + f", to {self.n(1, 9)}.{self.n(0, 99):02d} coins.")
            lines.append(f"{self.n(40, 400)} traders came to the {self.pick(['market', 'harbor', 'village square'])}.")
            return " ".join(lines)
        lines = [f"Weather for {self.pick(DAYS)}: {self.pick(WEATHER)} {self.pick(TIMES)}, "
                 f"{self.pick(WEATHER)} later."]
        lines.append(f"Temperatures between {self.n(-5, 10)} and {self.n(11, 30)} degrees.")
        lines.append(f"Wind from the {self.pick(['north', 'south', 'east', 'west'])} at {self.n(5, 60)} km/h.")
        lines.append(self.pick(["Take an umbrella if you go out.", "A good day to work in the garden.",
                                "Fishers should stay in the harbor.", "The roads may be slippery tonight."]))
        return " ".join(lines)

    def document(self) -> str:
        kinds: List[Callable[[], str]] = [self.story, self.story, self.letter, self.dialogue, self.animal,
                                          self.recipe, self.report]
        return self.pick(kinds)()


def generate_corpus(num_documents: int = 1500, seed: int = 1234) -> List[str]:
    """`num_documents` generated English documents (deterministic for a seed)."""
    writer = _Writer(seed)
    return [writer.document() for _ in range(num_documents)]


def write_jsonl(texts: List[str], path: str) -> None:
    """One {"text": ...} object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def build_example_data(output_dir: str, num_documents: int = 1500, vocab_size: int = 1024, seed: int = 1234,
                       workers: int = 1, quiet: bool = True) -> str:
    """Write corpus.jsonl, vocab.json, merges.txt and corpus_text_document.bin/.idx; returns the data prefix."""
    from mindtron.data.bpe_train import save_vocabulary, train_bpe
    from mindtron.data.preprocess import main as preprocess

    os.makedirs(output_dir, exist_ok=True)
    texts = generate_corpus(num_documents, seed)
    corpus = os.path.join(output_dir, "corpus.jsonl")
    write_jsonl(texts, corpus)
    vocab, merges = train_bpe(texts, vocab_size)
    vocab_path, merges_path = save_vocabulary(vocab, merges, output_dir)
    argv = ["--input", corpus, "--output-prefix", os.path.join(output_dir, "corpus"), "--json-keys", "text",
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab_path, "--merge-file", merges_path,
            "--append-eod", "--workers", str(workers)] + (["--quiet"] if quiet else [])
    return preprocess(argv)["text"]


def main(argv=None) -> None:
    default_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "gpt", "data")
    parser = argparse.ArgumentParser(description="Generate the bundled example corpus, vocabulary and .bin/.idx.")
    parser.add_argument("--output-dir", default=os.path.normpath(default_dir))
    parser.add_argument("--num-documents", type=int, default=1500)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    prefix = build_example_data(args.output_dir, args.num_documents, args.vocab_size, args.seed, args.workers,
                                quiet=False)
    print(f"data prefix: {prefix}")


if __name__ == "__main__":
    main()
