"""Train `tiny-story`, a small *trained* Llama that the demo recipes can cut up.

    python recipes/demo/train_demo_model.py              # about 15 minutes on 2 CPU cores
    python recipes/demo/train_demo_model.py --minutes 5  # quicker, a bit worse

Random demo models (make_demo_models.py) show that a recipe runs; a trained one
shows what it does: drop a layer and perplexity moves, by how much depending on
which layer. This script makes everything it needs itself:

- a corpus of synthetic English children's stories (characters with consistent
  names and pronouns, places, objects, simple cause and effect, counting with
  number agreement, dialogue), produced by the grammar below from a fixed seed.
  The text is generated entirely by this file, from word lists written for it,
  so it is ours and carries this repository's licence. About 4 MB of it is used
  for training (kept in memory only); `recipes/demo/heldout.txt` (about 30 KB,
  another seed, no story shared with training) is written for evaluation.
- a byte-level BPE tokenizer (tokenizers library, specials <s> </s> <pad>). Its
  post-processor puts <s> first, as the model saw text in training, and
  tokenizer_config.json says `add_bos_token: true` too (transformers 5 ignores
  that key when a tokenizer.json is present; the post-processor is what
  AutoTokenizer and recipekit's tokenizer both apply).
- a LlamaForCausalLM (hidden 128, 8 layers, 4 heads, 2 KV heads, tied
  embeddings) trained with plain torch on CPU: AdamW, linear warmup then cosine
  decay, windows of 256 tokens (<s> + 255 text tokens) cut at random offsets of
  the token stream, torch.compile'd. Training stops by wall-clock time
  (--minutes, compiling included), so the schedule follows the time elapsed
  after the first step and the result depends a little on machine speed;
  --steps gives a fixed step count and schedule instead.

Output: recipes/demo/models/tiny-story/ (float32 model.safetensors, config,
generation config, tokenizer). Finally it prints held-out perplexity of the
full model and with layers removed. Perplexity windowing (reproducible):
tokenize heldout.txt without special tokens, cut the ids into consecutive
non-overlapping chunks of 255 (the last one shorter), prefix each chunk with
<s>, score every chunk token (not the <s>), perplexity = exp(total NLL / number
of scored tokens).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "models" / "tiny-story"
HELDOUT = HERE / "heldout.txt"
SPECIALS = ["<s>", "</s>", "<pad>"]
SEQ = 256            # window length, <s> included
TRAIN_SEED, HELDOUT_SEED, TORCH_SEED = 1234, 98765, 0
TRAIN_BYTES, HELDOUT_BYTES = 4_000_000, 30_000

# --------------------------------------------------------------------------
# The story grammar
# --------------------------------------------------------------------------

GIRLS = ("Lily Mia Emma Anna Sara Lucy Zoe Ella Grace Rosa Nina Amy Kate Maya Ruby Ivy Lena Clara "
         "Alice Julia Hannah Olivia Sophie Eva Nora Daisy Molly Ada Bella Chloe Fiona Jenny").split()
BOYS = ("Tom Sam Ben Max Leo Jack Tim Noah Finn Oscar Jake Luke Adam Eli Hugo Owen Paul Peter Kai "
        "Theo Ryan Dan Milo Oliver Henry Felix Lucas Omar Ravi Toby Victor Will").split()
PET_NAMES = ("Pip Bo Fluff Nutmeg Pepper Sunny Dot Button Biscuit Coco Rusty Hazel Willow Poppy "
             "Bramble Clover Maple Pebble Sprout Acorn Ziggy Tuffy").split()
# animal: (singular, plural, sound, what it does, where it lives)
ANIMALS = {
    "fox": ("fox", "foxes", "yip", "ran", "forest"), "rabbit": ("rabbit", "rabbits", "squeak", "hopped", "meadow"),
    "bear": ("bear", "bears", "growl", "walked", "forest"), "mouse": ("mouse", "mice", "squeak", "ran", "barn"),
    "cat": ("cat", "cats", "meow", "climbed", "village"), "dog": ("dog", "dogs", "woof", "ran", "village"),
    "owl": ("owl", "owls", "hoot", "flew", "forest"), "duck": ("duck", "ducks", "quack", "swam", "pond"),
    "frog": ("frog", "frogs", "ribbit", "jumped", "pond"), "squirrel": ("squirrel", "squirrels", "chatter", "climbed", "forest"),
    "pig": ("pig", "pigs", "oink", "rolled", "farm"), "lamb": ("lamb", "lambs", "baa", "skipped", "farm"),
    "turtle": ("turtle", "turtles", "hiss", "crawled", "pond"), "hedgehog": ("hedgehog", "hedgehogs", "sniff", "rolled", "garden"),
    "cow": ("cow", "cows", "moo", "walked", "farm"), "hen": ("hen", "hens", "cluck", "pecked", "farm"),
    "horse": ("horse", "horses", "neigh", "galloped", "farm"), "bird": ("bird", "birds", "tweet", "flew", "garden"),
    "goat": ("goat", "goats", "maa", "climbed", "farm"), "bee": ("bee", "bees", "buzz", "flew", "garden"),
}
PET_KINDS = "fox rabbit bear mouse cat dog owl duck frog squirrel pig lamb turtle hedgehog".split()
CHAR_ADJ = "kind brave curious shy clever cheerful gentle funny quiet little young happy busy careful".split()
HOMES = ["in a small house near the forest", "in a big city", "on a farm", "in a little village by the sea",
         "in a blue house on a hill", "next to a quiet river", "in a cozy cottage", "above a bakery",
         "at the edge of a green meadow", "in a yellow house with a red door"]
PET_HOMES = ["in a cozy burrow under an old tree", "in a hollow log", "near a quiet pond", "in a warm nest",
             "at the edge of the forest", "in a little hole under a hill"]
# helpers: (name as used in text, gender)
HELPERS = [("Mom", "f"), ("Dad", "m"), ("Grandma", "f"), ("Grandpa", "m"), ("Aunt May", "f"),
           ("Uncle Joe", "m"), ("Miss Green", "f"), ("Mr. Brown", "m")]
# places: name, preposition, things seen there (singular, plural), an activity there (past tense)
PLACES = {
    "park": ("in", [("swing", "swings"), ("bench", "benches"), ("duck", "ducks")], "played on the swings"),
    "forest": ("in", [("tree", "trees"), ("mushroom", "mushrooms"), ("pine cone", "pine cones")], "walked among the tall trees"),
    "beach": ("on", [("shell", "shells"), ("crab", "crabs"), ("wave", "waves")], "built a sandcastle"),
    "garden": ("in", [("flower", "flowers"), ("butterfly", "butterflies"), ("carrot", "carrots")], "watered the flowers"),
    "farm": ("on", [("cow", "cows"), ("hen", "hens"), ("tractor", "tractors")], "fed the hens"),
    "library": ("at", [("book", "books"), ("shelf", "shelves"), ("map", "maps")], "read a book about dragons"),
    "market": ("at", [("apple", "apples"), ("basket", "baskets"), ("pear", "pears")], "bought some fruit"),
    "river": ("by", [("boat", "boats"), ("fish", "fish"), ("stone", "stones")], "threw stones into the water"),
    "lake": ("by", [("duck", "ducks"), ("boat", "boats"), ("frog", "frogs")], "watched the ducks swim"),
    "hill": ("on", [("flower", "flowers"), ("rock", "rocks"), ("sheep", "sheep")], "rolled down the grass"),
    "meadow": ("in", [("flower", "flowers"), ("bee", "bees"), ("rabbit", "rabbits")], "picked flowers"),
    "school": ("at", [("desk", "desks"), ("pencil", "pencils"), ("book", "books")], "painted a picture"),
    "playground": ("at", [("slide", "slides"), ("ball", "balls"), ("swing", "swings")], "went down the slide"),
    "zoo": ("at", [("lion", "lions"), ("monkey", "monkeys"), ("elephant", "elephants")], "watched the monkeys"),
    "kitchen": ("in", [("cup", "cups"), ("spoon", "spoons"), ("cookie", "cookies")], "baked cookies"),
    "bakery": ("at", [("cake", "cakes"), ("bun", "buns"), ("pie", "pies")], "smelled the fresh bread"),
    "barn": ("in", [("horse", "horses"), ("mouse", "mice"), ("bale of hay", "bales of hay")], "climbed the hay"),
    "harbor": ("at", [("ship", "ships"), ("gull", "gulls"), ("rope", "ropes")], "counted the ships"),
    "orchard": ("in", [("apple tree", "apple trees"), ("ladder", "ladders"), ("plum", "plums")], "picked apples"),
    "castle": ("at", [("tower", "towers"), ("flag", "flags"), ("door", "doors")], "climbed the tall tower"),
    "cave": ("in", [("bat", "bats"), ("rock", "rocks"), ("puddle", "puddles")], "listened to the echo"),
    "pond": ("by", [("frog", "frogs"), ("lily pad", "lily pads"), ("duck", "ducks")], "looked for tadpoles"),
    "village": ("in", [("shop", "shops"), ("cat", "cats"), ("lamp", "lamps")], "walked to the well"),
    "attic": ("in", [("box", "boxes"), ("trunk", "trunks"), ("spider", "spiders")], "opened an old trunk"),
}
# objects the characters own: (singular, plural)
OBJECTS = [("ball", "balls"), ("kite", "kites"), ("book", "books"), ("key", "keys"), ("hat", "hats"),
           ("box", "boxes"), ("shell", "shells"), ("stone", "stones"), ("cup", "cups"), ("lamp", "lamps"),
           ("boat", "boats"), ("map", "maps"), ("coin", "coins"), ("feather", "feathers"), ("drum", "drums"),
           ("ribbon", "ribbons"), ("bell", "bells"), ("crayon", "crayons"), ("marble", "marbles"),
           ("scarf", "scarves"), ("basket", "baskets"), ("bucket", "buckets"), ("ring", "rings"),
           ("umbrella", "umbrellas"), ("puzzle", "puzzles"), ("robot", "robots"), ("doll", "dolls"),
           ("teddy bear", "teddy bears"), ("whistle", "whistles"), ("toy car", "toy cars"),
           ("train", "trains"), ("blanket", "blankets"), ("sock", "socks"), ("button", "buttons"),
           ("paintbrush", "paintbrushes"), ("balloon", "balloons"), ("shoe", "shoes"), ("jar", "jars")]
# food: (singular, plural)
FOODS = [("apple", "apples"), ("pear", "pears"), ("plum", "plums"), ("banana", "bananas"),
         ("orange", "oranges"), ("cookie", "cookies"), ("carrot", "carrots"), ("cherry", "cherries"),
         ("strawberry", "strawberries"), ("muffin", "muffins"), ("egg", "eggs"), ("peach", "peaches"),
         ("sandwich", "sandwiches"), ("berry", "berries"), ("bun", "buns"), ("nut", "nuts")]
COLORS = "red blue green yellow purple pink white black brown golden silver orange".split()
SIZES = "big small tiny huge little long".split()
QUALITIES = "shiny old new soft heavy round bright pretty strange funny magic striped".split()
HIDING = ["under the bed", "behind the door", "in the garden", "under the table", "in the toy box",
          "behind the sofa", "in the kitchen", "under a pillow", "in the closet", "next to the window",
          "under a big leaf", "behind a tree", "in the grass", "under the stairs", "in a drawer"]
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen nineteen twenty").split()
ORDINALS = "first second third fourth fifth".split()
# weather: opener, condition sentence, what it leads to
WEATHER = {
    "rainy": ("One rainy morning", "It was raining outside", ["took an umbrella", "put on rain boots"],
              "jumped in the puddles"),
    "sunny": ("One sunny morning", "The sun was shining", ["put on a sun hat", "took a bottle of water"],
              "played outside all day"),
    "windy": ("One windy afternoon", "The wind was blowing hard", ["held on to the hat", "closed the window"],
              "flew a kite high in the sky"),
    "snowy": ("On a cold winter day", "Snow was falling", ["put on a warm coat", "wore mittens"],
              "built a snowman"),
    "hot": ("One hot summer day", "It was very hot", ["drank cold lemonade", "sat in the shade"],
            "splashed in the water"),
    "cloudy": ("One gray afternoon", "The sky was full of clouds", ["took a jacket", "stayed close to home"],
               "told stories inside"),
}
# a need, what it makes one do, how it ends
NEEDS = {
    "hungry": ("ate {a_food}", "was not hungry anymore"),
    "thirsty": ("drank a glass of {drink}", "felt much better"),
    "cold": ("put on a warm sweater", "was warm again"),
    "tired": ("lay down and took a nap", "woke up full of energy"),
    "bored": ("found a book and began to read", "was not bored anymore"),
    "sleepy": ("went to bed early", "slept all night"),
}
DRINKS = ["water", "milk", "juice", "lemonade", "warm cocoa"]
BUILDS = [("tower", "blocks"), ("sandcastle", "buckets of sand"), ("snowman", "snowballs"),
          ("bridge", "sticks"), ("wall", "stones"), ("nest", "twigs"), ("boat", "planks"), ("house", "boxes")]
TROUBLES = [  # someone in trouble: who, the problem, how it is fixed, how they feel after
    ("a little cat", "was stuck in a tall tree", "got a ladder and carried the cat down", "purred happily"),
    ("a baby bird", "had fallen out of its nest", "gently put the bird back in its nest", "sang a happy song"),
    ("a small dog", "was lost and could not find its home", "read the name on its collar and took it home",
     "wagged its tail"),
    ("an old turtle", "was stuck on its back", "carefully turned the turtle over", "slowly walked away"),
    ("a tiny mouse", "was caught in a box", "opened the box and let the mouse out", "ran off squeaking"),
    ("a duckling", "could not find its mother", "led the duckling back to the pond", "swam to its mother"),
]


def an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def count(n: int, sing: str, plur: str) -> str:
    return f"{NUMBERS[n]} {sing if n == 1 else plur}" if n <= 20 else f"{n} {plur}"


class Char:
    def __init__(self, name: str, g: str, kind: str):
        self.name, self.g, self.kind = name, g, kind

    @property
    def he(self): return "he" if self.g == "m" else "she"  # noqa: E704
    @property
    def him(self): return "him" if self.g == "m" else "her"  # noqa: E704
    @property
    def his(self): return "his" if self.g == "m" else "her"  # noqa: E704
    @property
    def himself(self): return "himself" if self.g == "m" else "herself"  # noqa: E704


class Story:
    """The state one story keeps consistent: who, where, what, the weather, counts."""

    def __init__(self, r: random.Random):
        self.r = r
        self.animal = r.random() < 0.3
        self.hero = self.new_char()
        self.friend = self.new_char(avoid={self.hero.name})
        self.helper = Char(*r.choice(HELPERS), "adult")
        self.place = r.choice(list(PLACES))
        self.weather = r.choice(list(WEATHER))
        sing, plur = r.choice(OBJECTS)
        self.obj_adj = r.choice([r.choice(COLORS), r.choice(SIZES) + " " + r.choice(COLORS),
                                 r.choice(QUALITIES), r.choice(QUALITIES) + " " + r.choice(COLORS)])
        self.obj, self.objs = sing, plur
        self.food = r.choice(FOODS)
        self.out: list[str] = []

    def new_char(self, avoid=frozenset()) -> Char:
        r = self.r
        g = r.choice("mf")
        if self.animal:
            name = r.choice([n for n in PET_NAMES if n not in avoid])
            return Char(name, g, r.choice(PET_KINDS))
        name = r.choice([n for n in (BOYS if g == "m" else GIRLS) if n not in avoid])
        return Char(name, g, "boy" if g == "m" else "girl")

    def say(self, *sentences: str) -> None:
        self.out.extend(sentences)

    def pick(self, *options):
        return self.r.choice(options)

    # ---- episodes -------------------------------------------------------
    def intro(self):
        h, r = self.hero, self.r
        kind = h.kind if h.kind in ("boy", "girl") else "little " + h.kind
        home = r.choice(PET_HOMES if self.animal else HOMES)
        self.say(self.pick(
            f"Once upon a time, there was {an(r.choice(CHAR_ADJ))} {kind} named {h.name}.",
            f"There once was {an(r.choice(CHAR_ADJ))} {kind} called {h.name}.",
            f"{h.name} was {an(r.choice(CHAR_ADJ))} {kind}.",
            f"Once there was {an(kind)} named {h.name}."))
        self.say(self.pick(f"{cap(h.he)} lived {home}.", f"{h.name} lived {home} with {h.his} family.",
                           f"{cap(h.he)} lived {home} and had a friend named {self.friend.name}."))
        if r.random() < 0.6:
            self.say(self.pick(
                f"{h.name} had {an(self.obj_adj)} {self.obj}.",
                f"{cap(h.his)} favorite toy was {an(self.obj_adj)} {self.obj}.",
                f"{h.name} loved {h.his} {self.obj_adj} {self.obj} very much.",
                f"Every day, {h.name} played with {h.his} {self.obj_adj} {self.obj}."))

    def weather_day(self):
        h, r = self.hero, self.r
        opener, cond, preps, fun = WEATHER[self.weather]
        prep = r.choice(preps)
        where = PLACES[self.place][0]
        self.say(f"{opener}, {h.name} looked out of the window.",
                 f"{cond}, so {h.he} {prep.replace('the hat', h.his + ' hat')}.")
        self.say(self.pick(
            f"Then {h.he} went to the {self.place} with {self.friend.name}.",
            f"{cap(h.he)} and {self.friend.name} went {where} the {self.place} together.",
            f"{h.name} asked {self.helper.name} to take {h.him} to the {self.place}."))
        self.say(self.pick(f"They {fun}.", f"{h.name} and {self.friend.name} {fun}.",
                           f"At the {self.place}, they {PLACES[self.place][2]}."))

    def trip(self):
        h, r = self.hero, self.r
        prep, things, act = PLACES[self.place]
        a, b = r.sample(things, 2)
        n = r.randint(2, 9)
        self.say(self.pick(
            f"One day, {h.name} and {self.helper.name} went to the {self.place}.",
            f"On Saturday, {self.helper.name} took {h.name} to the {self.place}.",
            f"{h.name} wanted to visit the {self.place}, so {self.helper.name} went with {h.him}."))
        self.say(f"{cap(prep)} the {self.place}, {h.he} saw {count(n, *a)} and {an(b[0])}.")
        if r.random() < 0.5:
            self.say(f'"Look at all the {a[1]}!" said {h.name}.',
                     f'"How many are there?" asked {self.helper.name}.',
                     f'{h.name} counted them. "There are {NUMBERS[n]}!" {h.he} said.')
        self.say(self.pick(f"Then they {act}.", f"After that, {h.name} {act}.",
                           f"{h.name} and {self.helper.name} {act} together."))
        self.say(self.pick(f"{h.name} had a wonderful time {prep} the {self.place}.",
                           f"It was a good day, and {h.name} was very happy.",
                           f"When it was time to go home, {h.name} said, \"Can we come back tomorrow?\""))

    def lost(self):
        h, r = self.hero, self.r
        spots = r.sample(HIDING, r.randint(2, 4))
        self.say(self.pick(
            f"One day, {h.name} could not find {h.his} {self.obj}.",
            f"But one morning, the {self.obj_adj} {self.obj} was gone!",
            f"One evening, {h.name} wanted to play with {h.his} {self.obj}, but it was not there."))
        self.say(f"{h.name} was very {self.pick('sad', 'worried', 'upset')}.",
                 f'"Where is my {self.obj}?" {h.he} asked.')
        for spot in spots[:-1]:
            self.say(self.pick(f"{cap(h.he)} looked {spot}, but it was not there.",
                               f"{h.name} looked {spot}. It was not there.",
                               f"Then {h.he} searched {spot}. No {self.obj} there."))
        helper = self.pick(self.friend.name, self.helper.name)
        self.say(self.pick(
            f"At last, {h.he} looked {spots[-1]}. There it was!",
            f"Then {helper} said, \"Did you look {spots[-1]}?\" {h.name} looked {spots[-1]}, and there was "
            f"the {self.obj}!",
            f"Finally, {h.name} found the {self.obj_adj} {self.obj} {spots[-1]}."))
        self.say(self.pick(f"{h.name} was so happy. {cap(h.he)} hugged {h.his} {self.obj}.",
                           f'"I found it!" shouted {h.name}. {cap(h.he)} was very happy.',
                           f"{h.name} smiled and promised to keep {h.his} {self.obj} in a safe place."))

    def share(self):
        h, f, r = self.hero, self.friend, self.r
        self.say(self.pick(f"{f.name} came to play with {h.name}.", f"One afternoon, {f.name} visited {h.name}.",
                           f"{h.name} met {f.name} {PLACES[self.place][0]} the {self.place}."))
        self.say(f'"Can I play with your {self.obj}?" asked {f.name}.')
        if r.random() < 0.5:
            self.say(f'"Yes, you can," said {h.name}. "Let us play together."',
                     f"{f.name} and {h.name} played with the {self.obj} all afternoon.")
        else:
            self.say(f'"No, it is mine!" said {h.name}.', f"{f.name} was sad and {f.he} began to cry.",
                     f'{self.helper.name} saw them and said, "It is good to share, {h.name}."',
                     f"{h.name} thought about it. Then {h.he} gave the {self.obj} to {f.name}.",
                     f'"Thank you!" said {f.name}. "You are welcome," said {h.name}.',
                     "They took turns, and soon they were both laughing.")
        self.say(self.pick(f"From that day on, {h.name} and {f.name} were best friends.",
                           f"{h.name} learned that sharing makes everyone happy.",
                           f"{h.name} and {f.name} were happy because they played together."))

    def counting(self):
        h, f, r = self.hero, self.friend, self.r
        sing, plur = self.food
        a = r.randint(2, 9)
        self.say(self.pick(f"{self.helper.name} gave {h.name} {count(a, sing, plur)}.",
                           f"{h.name} found {count(a, sing, plur)} in a basket.",
                           f"{h.name} picked {count(a, sing, plur)}."))
        if r.random() < 0.7:
            self.say(f'{h.name} counted them: "{", ".join(NUMBERS[1:a + 1])}."')
        kind = r.random()
        if kind < 0.4:
            b = r.randint(1, 6)
            self.say(f"Then {f.name} gave {h.him} {count(b, sing, plur)} more.",
                     f"Now {h.name} had {count(a + b, sing, plur)}.")
        elif kind < 0.8:
            b = r.randint(1, a)
            left = a - b
            self.say(f"{cap(h.he)} ate {count(b, sing, plur) if b > 1 else 'one'}" + (" of them." if b > 1 else "."))
            self.say(f"Now {h.he} had {count(left, sing, plur)} left." if left else
                     f"Now {h.he} had no {plur} left.")
        else:
            b = r.randint(1, a)
            self.say(f"{cap(h.he)} gave {count(b, sing, plur)} to {f.name}.",
                     f"{h.name} kept {count(a - b, sing, plur)} for {h.himself}." if a - b else
                     f"{h.name} gave all of them away, and {h.he} felt good.")
            self.say(f'"Thank you, {h.name}!" said {f.name}.')

    def need(self):
        h, r = self.hero, self.r
        state = r.choice(list(NEEDS))
        act, after = NEEDS[state]
        act = act.format(a_food=an(self.food[0]), drink=r.choice(DRINKS))
        self.say(self.pick(f"After a while, {h.name} felt {state}.", f"{h.name} was very {state}.",
                           f'"I am {state}," said {h.name}.'))
        self.say(self.pick(f"So {h.he} {act}.", f"{self.helper.name} said, \"Come here.\" Then {h.name} {act}.",
                           f"Because {h.he} was {state}, {h.name} {act}."))
        self.say(f"Soon {h.he} {after}.")

    def build(self):
        h, f, r = self.hero, self.friend, self.r
        thing, parts = r.choice(BUILDS)
        n = r.randint(3, 12)
        self.say(self.pick(f"{h.name} and {f.name} wanted to build {an(thing)}.",
                           f'"Let us build {an(thing)}!" said {f.name}.'))
        self.say(f"They used {NUMBERS[n]} {parts}.")
        if r.random() < 0.5:
            self.say(f"But the {thing} fell down!", f"{f.name} was sad, but {h.name} said, \"Let us try again.\"",
                     "This time they worked slowly and carefully.")
        self.say(self.pick(f"At last, the {thing} was finished. It was {r.choice(['tall', 'big', 'beautiful', 'strong'])}.",
                           f"Soon the {thing} was ready, and they were very proud."),
                 f"{self.helper.name} said, \"What a {r.choice(['wonderful', 'great', 'lovely', 'fine'])} {thing}!\"")

    def rescue(self):
        h, r = self.hero, self.r
        who, problem, fix, after = r.choice(TROUBLES)
        self.say(f"On the way home, {h.name} saw {who}.", f"It {problem}.")
        self.say(self.pick(f'"Oh no!" said {h.name}. "We must help!"', f"{h.name} wanted to help."))
        self.say(self.pick(f"{cap(h.he)} {fix}.", f"{h.name} and {self.helper.name} {fix}."))
        self.say(f"The {who.split()[-1]} {after}.",
                 self.pick(f"{h.name} felt proud.", f"{h.name} was glad that {h.he} could help."))

    def animals(self):
        h, r = self.hero, self.r
        kinds = r.sample(list(ANIMALS), 3)
        self.say(f"{h.name} went to see the animals with {self.helper.name}.")
        for k in kinds:
            sing, plur, sound, moves, home = ANIMALS[k]
            n = r.randint(1, 6)
            self.say(self.pick(
                f"{cap(h.he)} saw {count(n, sing, plur)}. The {plur if n > 1 else sing} said, \"{cap(sound)}!\"",
                f"There {'was' if n == 1 else 'were'} {count(n, sing, plur)} near the {home}.",
                f"{an(sing).capitalize()} {moves} past {h.him}. \"{cap(sound)}, {sound}!\" it said."))
        self.say(f'"I like the {ANIMALS[kinds[0]][1]} best," said {h.name}.')

    def day(self):
        h = self.hero
        food = self.food[1]
        self.say(f"First, {h.name} woke up and ate {food} for breakfast.",
                 f"Then {h.he} went to the {self.place}.",
                 f"After that, {h.he} {PLACES[self.place][2]}.",
                 f"In the evening, {self.helper.name} read {h.him} a story.",
                 f"Finally, {h.name} went to sleep.")

    def ending(self):
        h = self.hero
        self.say(self.pick(f"That night, {h.name} went to bed with a big smile.",
                           f"At the end of the day, {h.name} was tired but happy.",
                           f"It had been a very good day for {h.name}.",
                           f"{h.name} would never forget that day.",
                           "The end.", ""))


EPISODES = [Story.weather_day, Story.trip, Story.lost, Story.share, Story.counting, Story.need, Story.build,
            Story.rescue, Story.animals, Story.day]


def story(r: random.Random) -> str:
    s = Story(r)
    s.intro()
    for ep in r.sample(EPISODES, r.randint(2, 4)):
        ep(s)
    s.ending()
    return " ".join(x for x in s.out if x)


def corpus(seed: int, n_bytes: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    r, out, size = random.Random(seed), [], 0
    while size < n_bytes:
        text = story(r)
        if text in exclude:
            continue
        out.append(text)
        size += len(text) + 2
    return out


# --------------------------------------------------------------------------
# Tokenizer, model, training, evaluation
# --------------------------------------------------------------------------

def train_tokenizer(text: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer=trainer)
    return tok


def make_config(vocab: int, layers: int = 8):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        architectures=["LlamaForCausalLM"])


def lr_at(progress: float, peak: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    if progress < warmup:
        return peak * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def train(args, ids: torch.Tensor, vocab: int):
    from transformers import LlamaForCausalLM
    torch.manual_seed(TORCH_SEED)
    model = LlamaForCausalLM(make_config(vocab))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {len(ids) / 1e6:.2f}M training tokens", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=True)

    def loss_of(x):
        return model(input_ids=x, labels=x, use_cache=False).loss

    step_fn = torch.compile(loss_of) if args.compile else loss_of
    g = torch.Generator().manual_seed(TORCH_SEED)
    bos = torch.zeros(args.batch, 1, dtype=torch.long)
    budget = args.minutes * 60
    start, ready = time.time(), None  # ready: when the first (compiling) step is done
    step, ema, tokens = 0, None, 0
    while True:
        elapsed = time.time() - start
        if args.steps:
            progress = step / args.steps
        elif ready is None:
            progress = 0.0
        else:  # the schedule spans the time left after compiling, so warmup really warms up
            progress = (time.time() - ready) / max(1e-9, budget - (ready - start))
            if elapsed >= budget:
                progress = 1.0
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        offs = torch.randint(0, len(ids) - (SEQ - 1), (args.batch,), generator=g)
        x = torch.cat([bos, torch.stack([ids[o:o + SEQ - 1] for o in offs.tolist()])], dim=1)
        loss = step_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()
        if ready is None:
            ready = time.time()
            print(f"first step (compiling) took {ready - start:.0f}s", flush=True)
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if step == 1 or step % 25 == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  loss {value:.3f}  (avg {ema:.3f})",
                  flush=True)
    print(f"trained {step} steps, {tokens / 1e6:.2f}M tokens in {(time.time() - start) / 60:.1f} min; "
          f"final loss {value:.3f} (moving average {ema:.3f})", flush=True)
    return model


def save(model, tok, vocab: int) -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    n_bytes = sum(p.numel() for p in model.parameters()) * 4
    dtype = torch.float32 if n_bytes <= 10_500_000 else torch.bfloat16
    model = model.to(dtype)
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 0, 1
    model.generation_config.pad_token_id = 2
    model.save_pretrained(OUT, max_shard_size="1GB")
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "add_bos_token": True, "add_eos_token": False, "model_max_length": 512}, indent=2) + "\n")
    keep = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    for p in OUT.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    missing = keep - {p.name for p in OUT.iterdir()}
    assert not missing, f"missing in {OUT}: {missing}"


def drop(model, layers: set[int]):
    """A copy of `model` without `layers`, the rest renumbered (what a drop_layers recipe makes)."""
    from transformers import LlamaForCausalLM
    n = model.config.num_hidden_layers
    keep = [i for i in range(n) if i not in layers]
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(keep)
    new = LlamaForCausalLM(config)
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(i) in layers:
                continue
            name = f"model.layers.{keep.index(int(i))}.{rest}"
        state[name] = t
    new.load_state_dict(state, strict=False)  # lm_head is tied to embed_tokens
    new.tie_weights()
    return new.eval()


@torch.no_grad()
def perplexity(model, ids: list[int], bos: int) -> float:
    chunk = SEQ - 1
    windows = [[bos] + ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    nll, n = 0.0, 0
    for w in windows:
        x = torch.tensor([w])
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


def evaluate() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(OUT)
    model = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
    text = HELDOUT.read_text()
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = model.config.num_hidden_layers
    print(f"\nheld-out perplexity ({HELDOUT.name}: {len(text)} chars, {len(ids)} tokens, windows of <s> + "
          f"{SEQ - 1} tokens):")
    rows = [("full model", set()), ("without layer 0 (first)", {0}),
            ("without layers 3 and 4 (middle)", {3, 4}), (f"without layer {n - 1} (last)", {n - 1})]
    for label, layers in rows:
        m = drop(model, layers) if layers else model
        print(f"  {label:32s} {perplexity(m, ids, tok.bos_token_id):8.2f}", flush=True)
    prompt = [tok.bos_token_id] + tok("Once upon a time, there was", add_special_tokens=False)["input_ids"]
    x = torch.tensor([prompt])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=60, do_sample=False)
    print("\nsample (greedy):", tok.decode(out[0], skip_special_tokens=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget (default 15)")
    ap.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead (repeatable)")
    ap.add_argument("--batch", type=int, default=8, help="windows per step (default 8)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size at most (default 2048)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (slower)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the saved model")
    args = ap.parse_args()
    torch.set_num_threads(2)
    random.seed(TORCH_SEED)
    torch.manual_seed(TORCH_SEED)
    if args.eval_only:
        evaluate()
        return

    t0 = time.time()
    train_text = corpus(TRAIN_SEED, TRAIN_BYTES)
    held = corpus(HELDOUT_SEED, HELDOUT_BYTES, exclude=frozenset(train_text))
    HELDOUT.write_text("\n\n".join(held) + "\n")
    print(f"corpus: {len(train_text)} training stories ({sum(map(len, train_text)) / 1e6:.2f} MB), "
          f"{len(held)} held-out stories ({HELDOUT.stat().st_size / 1e3:.1f} KB) in {time.time() - t0:.0f}s", flush=True)

    tok = train_tokenizer(train_text, args.vocab)
    vocab = tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    ids = torch.tensor(tok.encode("\n\n".join(train_text)).ids, dtype=torch.long)
    print(f"tokenizer: {vocab} tokens, {sum(map(len, train_text)) / len(ids):.2f} chars per token", flush=True)

    model = train(args, ids, vocab)
    save(model.eval(), tok, vocab)
    size = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"\nsaved {OUT} ({size / 1e6:.2f} MB):", flush=True)
    for p in sorted(OUT.iterdir()):
        print(f"  {p.name:24s} {p.stat().st_size:>10,d}")
    evaluate()


if __name__ == "__main__":
    main()
