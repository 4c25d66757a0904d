"""Fictional-fact documents: invented people, organisations and places with random attributes.

No base model can know these entities: every name is a random combination of syllables, checked to
be unique inside its document (no name's word contains another's). Each fact is stated in one of
several phrasings and asked with a *different* phrasing (separate question templates); its answer
is a short span of the text (a name, a number, a word). Neutral distractor sentences, which state
no askable fact, pad a document to about ``words`` words. Everything follows from one integer seed
through ``random.Random(seed)``.

Example::

    facts_document(7, words=300)
    -> {"context": "Tovrin Maskel was born in 1964. ...", "kind": "facts", "seed": 7,
        "questions": [{"question": "In which year was Tovrin Maskel born?", "answer": "1964",
                       "attribute": "birth_year"}, ...]}
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ENTITY_KINDS = ("person", "organisation", "place")


@dataclass(frozen=True)
class Attribute:
    """One askable attribute: how the text states it and how a question asks for it.

    Templates fill ``{name}`` (the entity, or a person's surname after the first mention in some
    statements), ``{value}`` (the answer) and ``{a_value}`` (the value with "a"/"an").
    """

    statements: tuple[str, ...]
    questions: tuple[str, ...]


PERSON_ATTRIBUTES = {
    "birth_year": Attribute(
        ("{name} was born in {value}.", "{name} came into the world in {value}.",
         "Records give {value} as the year of {name}'s birth."),
        ("In which year was {name} born?", "What is the birth year of {name}?")),
    "home_city": Attribute(
        ("{name} lives in {value}.", "Home for {name} is the town of {value}.",
         "{name} has settled in {value}."),
        ("Where does {name} reside?", "Which town is {name}'s home?")),
    "profession": Attribute(
        ("{name} works as {a_value}.", "By trade, {name} is {a_value}.", "{name} earns a living as {a_value}."),
        ("What is {name}'s profession?", "What job does {name} have?")),
    "favourite_colour": Attribute(
        ("{name}'s favourite colour is {value}.", "Of all colours, {name} likes {value} best.",
         "{name} prefers {value} to any other colour."),
        ("Which colour does {name} love most?", "What is the preferred colour of {name}?")),
    "employer": Attribute(
        ("{name} is employed by {value}.", "{name} is on the staff of {value}.", "{value} employs {name}."),
        ("Which organisation does {name} work for?", "Who is {name}'s employer?")),
}
ORGANISATION_ATTRIBUTES = {
    "founding_year": Attribute(
        ("{name} was founded in {value}.", "{name} has existed since {value}.",
         "The founding of {name} dates back to {value}."),
        ("In what year was {name} established?", "When did {name} come into being?")),
    "headquarters": Attribute(
        ("{name} has its headquarters in {value}.", "{name} is based in {value}.",
         "The main offices of {name} are in {value}."),
        ("In which town does {name} keep its head office?", "Where is {name} headquartered?")),
    "founder": Attribute(
        ("{name} was started by {value}.", "{value} founded {name}.", "{name} owes its existence to {value}."),
        ("Who created {name}?", "Who is the founder of {name}?")),
    "product": Attribute(
        ("{name} makes {value}.", "{name} is best known for its {value}.", "The main product of {name} is {value}."),
        ("What does {name} produce?", "What goods does {name} sell?")),
    "employees": Attribute(
        ("{name} has {value} employees.", "{value} people work for {name}.", "The staff of {name} numbers {value}."),
        ("How large is the workforce of {name}?", "How many people are on {name}'s payroll?")),
}
PLACE_ATTRIBUTES = {
    "population": Attribute(
        ("{name} has a population of {value}.", "{value} people call {name} home.",
         "The census counted {value} residents in {name}."),
        ("How many inhabitants does {name} have?", "What is the number of people living in {name}?")),
    "river": Attribute(
        ("The {value} River flows through {name}.", "{name} lies on the banks of the river {value}.",
         "The river {value} winds past {name}."),
        ("What river passes through {name}?", "Which river is {name} built beside?")),
    "mayor": Attribute(
        ("The mayor of {name} is {value}.", "{value} serves as mayor of {name}.",
         "{name} is governed by mayor {value}."),
        ("Who is {name}'s mayor?", "Who runs the town council of {name}?")),
    "elevation": Attribute(
        ("{name} sits {value} metres above sea level.", "{name} lies at an altitude of {value} metres."),
        ("How high above the sea is {name}, in metres?", "What is the elevation of {name} in metres?")),
}
ATTRIBUTES = {"person": PERSON_ATTRIBUTES, "organisation": ORGANISATION_ATTRIBUTES, "place": PLACE_ATTRIBUTES}

PROFESSIONS = ("architect", "baker", "beekeeper", "cartographer", "carpenter", "chemist", "clockmaker", "dentist",
               "engineer", "florist", "geologist", "glassblower", "jeweller", "librarian", "locksmith", "optician",
               "pharmacist", "potter", "saddler", "sculptor", "surveyor", "tailor", "translator", "violinist", "weaver")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "teal", "crimson", "violet", "amber", "indigo",
           "maroon", "turquoise", "ochre", "silver", "lavender")
PRODUCTS = ("ceramic valves", "folding bicycles", "glass lanterns", "weather balloons", "copper kettles",
            "wool blankets", "river barges", "clockwork toys", "solar ovens", "paper kites", "brass telescopes",
            "canvas tents", "herbal soaps", "oak barrels", "steel springs", "rope ladders")
ORGANISATION_SUFFIXES = ("Industries", "Works", "Holdings", "Laboratories", "Collective", "Foundry", "Trading Company",
                         "Systems", "Guild", "Cooperative")
PLACE_SUFFIXES = ("", "", "", "ford", "holm", "wick", "mere", "stad", "bury")
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v",
           "z", "sh", "h", "j", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "k", "nd", "x")

# Sentences that state nothing askable: no numbers, colours, professions or products.
ENTITY_DISTRACTORS = (
    "{name} comes up often in local conversation.", "Many stories are told about {name}.",
    "Visitors often mention {name} in their letters.", "Little else is written about {name} in the old records.",
    "{name} is mentioned in several local guidebooks.", "Opinions about {name} differ from one person to the next.",
    "{name} appears in a few photographs from that time.", "Some details about {name} remain uncertain.",
)
GENERIC_DISTRACTORS = (
    "The weather that season was mild and dry.", "Nobody kept a detailed diary of those days.",
    "The regional library holds several maps of the area.", "Most of the archive was catalogued much later.",
    "Travellers usually arrived by the coastal road.", "The markets were busy on most mornings.",
    "Letters from that period are hard to read today.", "A few of the old buildings still stand.",
    "The winters in the region can be long.", "Local newspapers covered the events only briefly.",
    "Historians still argue about the exact order of events.", "Trains on the northern line were often late.",
    "Much of the farmland was divided into small plots.", "Festivals were held at the end of every harvest.",
)


class NameBook:
    """Invents capitalised names for one document; no word of a new name contains, or is inside, an old one."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words: list[str] = []

    def _syllable(self, last: bool) -> str:
        coda = self.rng.choice(_CODAS) if last or self.rng.random() < 0.2 else ""
        return self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + coda

    def word(self, syllables: int, suffix: str = "") -> str:
        while True:
            word = ("".join(self._syllable(i == syllables - 1) for i in range(syllables)) + suffix).capitalize()
            lower = word.lower()
            if len(word) >= 4 and not any(lower in old or old in lower for old in self.words):
                self.words.append(lower)
                return word

    def person(self) -> str:
        return f"{self.word(2)} {self.word(self.rng.choice((2, 3)))}"

    def organisation(self) -> str:
        return f"{self.word(2)} {self.rng.choice(ORGANISATION_SUFFIXES)}"

    def place(self) -> str:
        return self.word(self.rng.choice((2, 3)), self.rng.choice(PLACE_SUFFIXES))

    def new(self, kind: str) -> str:
        return {"person": self.person, "organisation": self.organisation, "place": self.place}[kind]()


def with_article(value: str) -> str:
    return ("an " if value[0].lower() in "aeiou" else "a ") + value


def _linked_or_new(kind: str, rng: random.Random, names: NameBook, present: dict[str, list[str]], exclude: str) -> str:
    """A name of ``kind`` described in the document (most of the time, when there is one) or a new one."""
    candidates = [name for name in present.get(kind, []) if name != exclude]
    return rng.choice(candidates) if candidates and rng.random() < 0.5 else names.new(kind)


def attribute_value(attribute: str, subject: str, rng: random.Random, names: NameBook,
                    present: dict[str, list[str]]) -> str:
    """A random value for ``attribute`` of ``subject``; names link to entities in ``present`` when they can."""
    if attribute == "birth_year":
        return str(rng.randint(1921, 2004))
    if attribute == "founding_year":
        return str(rng.randint(1820, 2015))
    if attribute in ("home_city", "headquarters"):
        return _linked_or_new("place", rng, names, present, subject)
    if attribute == "employer":
        return _linked_or_new("organisation", rng, names, present, subject)
    if attribute in ("founder", "mayor"):
        return _linked_or_new("person", rng, names, present, subject)
    if attribute == "profession":
        return rng.choice(PROFESSIONS)
    if attribute == "favourite_colour":
        return rng.choice(COLOURS)
    if attribute == "product":
        return rng.choice(PRODUCTS)
    if attribute == "employees":
        return f"{rng.randint(12, 9_800):,}"
    if attribute == "population":
        return f"{rng.randint(1_200, 950_000):,}"
    if attribute == "river":
        return names.word(2)
    if attribute == "elevation":
        return str(rng.randint(12, 2_400))
    raise ValueError(f"attribute={attribute!r}: expected one of {', '.join(a for d in ATTRIBUTES.values() for a in d)}")


def entity_facts(kind: str, name: str, facts: int, rng: random.Random, names: NameBook,
                 present: dict[str, list[str]]) -> tuple[list[str], list[dict]]:
    """``facts`` statements about one entity (first one names it in full) and one question per statement."""
    attributes = ATTRIBUTES[kind]
    chosen = rng.sample(sorted(attributes), min(facts, len(attributes)))
    sentences, questions = [], []
    for position, attribute in enumerate(chosen):
        value = attribute_value(attribute, name, rng, names, present)
        template = attributes[attribute]
        mention = name.split()[-1] if kind == "person" and position > 0 and rng.random() < 0.5 else name
        sentence = rng.choice(template.statements).format(name=mention, value=value, a_value=with_article(value))
        sentences.append(sentence[0].upper() + sentence[1:])
        questions.append({"question": rng.choice(template.questions).format(name=name), "answer": value,
                          "attribute": attribute})
    return sentences, questions


def pad_with_distractors(paragraphs: list[list[str]], subjects: list[str], words: int, rng: random.Random) -> None:
    """Insert distractor sentences (never before a paragraph's first sentence) until about ``words`` words."""
    total = sum(len(sentence.split()) for paragraph in paragraphs for sentence in paragraph)
    while total < words:
        index = rng.randrange(len(paragraphs))
        if rng.random() < 0.5:
            sentence = rng.choice(ENTITY_DISTRACTORS).format(name=subjects[index])
        else:
            sentence = rng.choice(GENERIC_DISTRACTORS)
        position = rng.randint(1, len(paragraphs[index]))
        if sentence == paragraphs[index][position - 1]:  # no sentence twice in a row
            continue
        paragraphs[index].insert(position, sentence)
        total += len(sentence.split())


def facts_document(seed: int, words: int = 300, entities: tuple[int, int] = (3, 6),
                   facts_per_entity: tuple[int, int] = (2, 4)) -> dict:
    """A document about ``entities`` (min, max) invented entities, padded to about ``words`` words.

    Returns ``{"context", "questions": [{"question", "answer", "attribute"}], "kind": "facts", "seed"}``
    with one question per stated fact, in random order; every answer occurs verbatim in the context.
    """
    if entities[0] < 1 or entities[0] > entities[1]:
        raise ValueError(f"entities={entities}: expected (min, max) with 1 <= min <= max")
    if facts_per_entity[0] < 1 or facts_per_entity[0] > facts_per_entity[1]:
        raise ValueError(f"facts_per_entity={facts_per_entity}: expected (min, max) with 1 <= min <= max")
    rng = random.Random(seed)
    names = NameBook(rng)
    kinds = [rng.choice(ENTITY_KINDS) for _ in range(rng.randint(*entities))]
    subjects = [names.new(kind) for kind in kinds]
    present: dict[str, list[str]] = {}
    for kind, subject in zip(kinds, subjects):
        present.setdefault(kind, []).append(subject)
    paragraphs, questions = [], []
    for kind, subject in zip(kinds, subjects):
        sentences, asked = entity_facts(kind, subject, rng.randint(*facts_per_entity), rng, names, present)
        paragraphs.append(sentences)
        questions.extend(asked)
    pad_with_distractors(paragraphs, subjects, words, rng)
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    rng.shuffle(questions)
    context = "\n\n".join(" ".join(paragraphs[index]) for index in order)
    return {"context": context, "questions": questions, "kind": "facts", "seed": seed}


def locality_item(seed: int) -> dict:
    """A short self-contained item: one invented entity, two facts, one question about one of them.

    It fits in any window together with its question, so accuracy with and without a memory LoRA can
    be compared on text the LoRA never saw. ``{"context", "questions": [one], "kind": "locality", "seed"}``.
    """
    rng = random.Random(seed)
    names = NameBook(rng)
    kind = rng.choice(ENTITY_KINDS)
    subject = names.new(kind)
    sentences, questions = entity_facts(kind, subject, 2, rng, names, {kind: [subject]})
    return {"context": " ".join(sentences), "questions": [rng.choice(questions)], "kind": "locality", "seed": seed}
