"""The built-in safety world: determinism, split hygiene, schema, label noise, placeholder harm."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter

import pytest

from equilibrate_pl.commands.world import main as world_main
from equilibrate_pl.data.schema import GROUP_NAMES, RECORD_FIELDS, SAFETY_LABEL_FIELDS
from equilibrate_pl.data.world import GENERAL_TASKS, LOOKALIKE_TASKS, PEOPLE, RISKY_ITEMS, SIZES, build_world

# Written independently of the module: words that make a prompt explicitly risky.
EXPLICIT = re.compile(
    r"\b(bomb|gun|rifle|napalm|thermite|molotov|grenade|flamethrower|crossbow|meth|cocaine|fentanyl|heroin|"
    r"lsd|ecstasy|ricin|gas|cyanide|arsenic|poison|ransomware|keylogger|virus|botnet|phishing|spyware|hack\w*|"
    r"crack|launder|counterfeit|smuggle|drugs?|sedative|detonator|silencer|kill\w*|shoot|steal|"
    r"oxycodone|rohypnol|strychnine|thallium|antifreeze|pills|explosive|shotgun)\b",
    re.I,
)
REFUSAL_START = re.compile(r"^(I can't|I'm sorry|Sorry|I won't|I'm not able)")
PLACEHOLDER = re.compile(r"\[[a-z ]+\]")


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0, size="tiny")


@pytest.fixture(scope="module")
def default_world():
    return build_world(seed=0, size="default")


def _all_records(w):
    out = {}
    for split in ("train", "eval"):
        out[f"prompts_{split}"] = w.prompts(split)
        out[f"sft_{split}"] = w.sft_records(split)
        out[f"pref_{split}"] = w.preference_records(split)
        out[f"pool_{split}"] = w.safety_pool(split)
    return out


def test_same_seed_same_records_and_other_seed_differs(world):
    assert _all_records(build_world(seed=0, size="tiny")) == _all_records(world)
    other = build_world(seed=1, size="tiny")
    assert [r["prompt"] for r in other.prompts("train")] != [r["prompt"] for r in world.prompts("train")]


def test_sizes_match_the_table_and_every_group_is_present():
    for size in ("tiny", "default"):
        w = build_world(seed=3, size=size)
        for split in ("train", "eval"):
            want = SIZES[size][split]
            counts = Counter(r["group"] for r in w.prompts(split))
            assert counts["EHD"] == want["EHD"] and counts["IHD"] == want["IHD"] and counts["MHD"] == want["MHD"]
            assert counts["general"] == want["general"] + want["lookalike"]
            assert sum(r["meta"]["lookalike"] for r in w.prompts(split)) == want["lookalike"]
            assert all(counts[g] > 0 for g in GROUP_NAMES)
    tiny = build_world(size="tiny")
    assert 250 <= sum(len(tiny.prompts(s)) for s in ("train", "eval")) <= 350


def test_prompts_are_unique_and_train_eval_are_disjoint(world):
    train = [r["prompt"] for r in world.prompts("train")]
    evals = [r["prompt"] for r in world.prompts("eval")]
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)
    noise = [r["prompt"] for r in world.safety_pool("train") if r["meta"]["noisy"]]
    assert not set(noise) & set(train), "noise look-alikes are extra prompts, not copies with flipped labels"


def test_slot_fillers_do_not_cross_splits(default_world):
    text = {s: " ".join(r["prompt"].lower() for r in default_world.prompts(s)) for s in ("train", "eval")}
    for task, _, _ in GENERAL_TASKS + LOOKALIKE_TASKS:
        assert not (task.lower() in text["train"] and task.lower() in text["eval"]), task
    for item, _ in RISKY_ITEMS:
        hits = [s for s in ("train", "eval") if re.search(rf"\b{re.escape(item.lower())}\b", text[s])]
        assert len(hits) <= 1, item
    for person in PEOPLE:
        hits = [s for s in ("train", "eval") if f"my {person}" in text[s]]
        assert len(hits) <= 1, person


def test_records_follow_the_schema(world):
    kinds = {"prompts": "prompt", "sft": "sft", "pref": "preference", "pool": "preference"}
    for name, rows in _all_records(world).items():
        ids = [r["id"] for r in rows]
        assert len(set(ids)) == len(ids), name
        for r in rows:
            kind = kinds[name.split("_")[0]]
            # exactly the kind's fields; a preference pair also carries its (true) safety labels
            assert set(r) == set(RECORD_FIELDS[kind]) | (set(SAFETY_LABEL_FIELDS) if kind == "preference" else set()), name
            assert r["group"] in GROUP_NAMES and r["source"] == "builtin-world"
            assert r["meta"]["true_group"] in GROUP_NAMES
            assert r["meta"]["ideal"] == ("help" if r["meta"]["true_group"] == "general" else "refuse")
            json.dumps(r)


def test_lookalikes_are_general_helpful_and_carry_risky_words(world):
    looks = [r for s in ("train", "eval") for r in world.prompts(s) if r["meta"]["lookalike"]]
    assert looks
    for r in looks:
        assert r["group"] == "general" and r["meta"]["ideal"] == "help"
        assert EXPLICIT.search(r["prompt"]) or re.search(r"\b(blow|attack|terminate|execute|destroy|toxic|fire|"
                                                         r"smash|snipe|explode|torch|murder|dissect|crush|beat|wipe|"
                                                         r"fight|break|knock|bleed|bombing|blood)\w*", r["prompt"], re.I), r["prompt"]


def test_groups_carry_their_cues(default_world):
    for split in ("train", "eval"):
        for r in default_world.prompts(split, ["IHD"]):
            assert not EXPLICIT.search(r["prompt"]), r["prompt"]
            assert re.search(r"\bmy \w+", r["prompt"], re.I)
        for r in default_world.prompts(split, ["EHD"]):
            assert EXPLICIT.search(r["prompt"]), r["prompt"]
            assert not re.search(r"\bmy\b", r["prompt"]), r["prompt"]
        for r in default_world.prompts(split, ["MHD"]):
            assert EXPLICIT.search(r["prompt"]) and re.search(r"\bmy \w+", r["prompt"], re.I), r["prompt"]
        for r in default_world.prompts(split, ["general"]):
            if not r["meta"]["lookalike"]:
                assert not re.search(r"\b(bomb|gun|meth|poison|hack|kill|shoot|drug)", r["prompt"], re.I), r["prompt"]


def test_harmful_responses_are_placeholders_only(world):
    forbidden = re.compile(r"\d|\b(grams?|ml|litres?|degrees|mix|heat|boil|dissolve|ignite|wire|dose)\b", re.I)
    pairs = [r for s in ("train", "eval") for r in world.preference_records(s) if r["meta"]["ideal"] == "refuse"]
    assert pairs
    for r in pairs:
        harmful = r["rejected"]
        assert len(PLACEHOLDER.findall(harmful)) >= 2, harmful
        # besides placeholders, only the restated request: no quantities, no procedure verbs
        assert not forbidden.search(PLACEHOLDER.sub("", harmful)), harmful


def test_good_responses_refuse_harm_and_help_general(world):
    for split in ("train", "eval"):
        for r in world.sft_records(split):
            if r["meta"]["ideal"] == "refuse":
                assert REFUSAL_START.match(r["response"]), r["response"]
                assert not PLACEHOLDER.search(r["response"])
            else:
                assert not REFUSAL_START.match(r["response"]), r["response"]
        for r in world.preference_records(split, ["general"]):
            assert REFUSAL_START.match(r["rejected"]) and not REFUSAL_START.match(r["chosen"])
    kinds = Counter(r["meta"]["response_kind"] for r in world.sft_records("train", ["EHD", "IHD", "MHD"]))
    assert kinds["refusal"] > 0 and kinds["helpful"] > 0, "harmful prompts get both refusals and safe help"


@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.3])
def test_safety_pool_noise_fraction(fraction):
    w = build_world(seed=0, size="default", noise_fraction=fraction)
    pool = w.safety_pool("train")
    noisy = [r for r in pool if r["meta"]["noisy"]]
    n_safety = len(w.prompts("train", ["EHD", "IHD", "MHD"]))
    assert len(pool) == n_safety + len(noisy)
    assert abs(len(noisy) / len(pool) - fraction) <= 1 / len(pool)
    for r in noisy:
        assert r["group"] in ("EHD", "IHD", "MHD"), "noise is labelled harmful, like in real unsorted sets"
        assert r["meta"]["true_group"] == "general" and r["meta"]["lookalike"] and r["meta"]["ideal"] == "help"
        assert REFUSAL_START.match(r["chosen"]) and not REFUSAL_START.match(r["rejected"])
    assert all(r["meta"]["true_group"] == r["group"] for r in pool if not r["meta"]["noisy"])


def test_safety_pool_fraction_override_and_bounds(world):
    small = {r["id"] for r in world.safety_pool("train", noise_fraction=0.1)}
    large = {r["id"] for r in world.safety_pool("train", noise_fraction=0.25)}
    assert small < large, "a larger noise fraction only adds rows"
    with pytest.raises(ValueError, match="noise_fraction"):
        world.safety_pool("train", noise_fraction=0.6)
    with pytest.raises(ValueError, match="noise_fraction"):
        build_world(noise_fraction=-0.1)


def test_general_pool_and_group_filters(world):
    assert world.general_pool("eval") == world.preference_records("eval", ["general"])
    assert {r["group"] for r in world.prompts("train", "IHD")} == {"IHD"}
    with pytest.raises(ValueError, match="split"):
        world.prompts("test")
    with pytest.raises(ValueError, match="group"):
        world.prompts("train", ["harmful"])
    with pytest.raises(ValueError, match="size"):
        build_world(size="huge")


def test_no_xstest_prompt_is_copied(shared_data, default_world):
    with open(shared_data / "xstest" / "xstest_prompts.csv", newline="", encoding="utf-8") as fh:
        xs = {" ".join(row["prompt"].lower().split()) for row in csv.DictReader(fh)}
    for split in ("train", "eval"):
        for r in default_world.prompts(split):
            text = " ".join(r["prompt"].lower().split())
            assert not any(x in text for x in xs), r["prompt"]


def test_corpus_covers_every_response(world):
    corpus = set(world.corpus())
    for r in world.preference_records("train"):
        assert {r["prompt"], r["chosen"], r["rejected"]} <= corpus


def test_cli_writes_jsonl_files(tmp_path, capsys):
    assert world_main(["--size", "tiny", "--seed", "0", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "EHD" in out and "lookalike" in out
    w = build_world(seed=0, size="tiny")
    expected = {
        "prompts_train.jsonl": w.prompts("train"), "sft_eval.jsonl": w.sft_records("eval"),
        "preference_train.jsonl": w.preference_records("train"), "safety_pool_train.jsonl": w.safety_pool("train"),
        "contrastive_eval.jsonl": w.contrastive_pool("eval"),
    }
    for name, rows in expected.items():
        lines = (tmp_path / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows
    assert len(list(tmp_path.iterdir())) == 10, "no temporary files left behind"
    assert world_main(["--size", "tiny", "--noise-fraction", "0.9"]) == 2


def test_question_frames_do_not_reveal_the_group(default_world):
    from equilibrate_pl.data.world import FRAMES

    patterns = [re.compile(re.escape(f).replace(r"\{x\}", ".+") + r"(?: Thanks!| Please keep it short\.)?$", re.I)
                for f in FRAMES]
    for split in ("train", "eval"):
        used: dict[str, set[int]] = {}
        for r in default_world.prompts(split):
            hits = [i for i, p in enumerate(patterns) if p.search(r["prompt"])]
            assert hits, r["prompt"]
            used.setdefault(r["group"], set()).update(hits)
        assert len({frozenset(v) for v in used.values()}) == 1, f"{split}: groups use different frames {used}"


def test_a_bag_of_words_model_generalises_from_train_to_eval(default_world):
    """The world is learnable from its lexical cues, not from template wording.

    Bernoulli naive Bayes on word presence, fit on train prompts, must predict the ideal action
    (refuse / help) on the disjoint eval prompts well above chance (measured: 0.90-0.94 over seeds
    0-4). When the question wording differed between groups this fell to ~0.65, because every
    eval general prompt used a frame seen only in harmful train prompts.
    """

    def words(text):
        return set(re.findall(r"[a-z']+", text.lower()))

    counts = {True: Counter(), False: Counter()}
    n = Counter()
    for r in default_world.prompts("train"):
        y = r["meta"]["ideal"] == "refuse"
        n[y] += 1
        counts[y].update(words(r["prompt"]))
    vocab = set(counts[True]) | set(counts[False])

    def log_joint(text, y):
        return math.log(n[y]) + sum(math.log((counts[y][t] + 1) / (n[y] + 2)) for t in words(text) & vocab)

    right: dict[str, list[bool]] = {}
    for r in default_world.prompts("eval"):
        pred = log_joint(r["prompt"], True) > log_joint(r["prompt"], False)
        kind = "lookalike" if r["meta"]["lookalike"] else r["group"]
        right.setdefault(kind, []).append(pred == (r["meta"]["ideal"] == "refuse"))
    overall = sum(map(sum, right.values())) / sum(map(len, right.values()))
    assert overall >= 0.8, right
    assert all(sum(v) / len(v) >= 0.55 for v in right.values()), {k: sum(v) / len(v) for k, v in right.items()}


def test_safety_labels_mark_only_harmful_compliance_unsafe(world):
    """Labels are the truth, also on the noisy pool rows: a harmful compliance (placeholder text) is
    unsafe; refusals, safe redirects and answers to benign prompts are safe."""
    for split in ("train", "eval"):
        for r in world.preference_records(split) + world.safety_pool(split):
            for side in ("chosen", "rejected"):
                assert r[f"{side}_unsafe"] == bool(PLACEHOLDER.search(r[side])), (r["id"], side)
            if r["meta"]["true_group"] != "general":
                assert (r["chosen_unsafe"], r["rejected_unsafe"]) == (False, True)


def test_contrastive_pool_prefers_safe_and_on_topic_answers_over_off_topic_ones(world):
    for split in ("train", "eval"):
        pool = world.contrastive_pool(split)
        examples = {ex.id: ex for ex in world.examples[split]}
        assert len(pool) == len(examples)  # one pair per prompt
        assert len({r["id"] for r in pool}) == len(pool)
        for r in pool:
            ex = examples[r["id"].removesuffix("-offtopic")]
            donor = examples[r["meta"]["off_topic_from"]]  # a benign prompt of the same split: its own answer
            assert donor.ideal == "help" and r["rejected"] == donor.helpful and donor.prompt != r["prompt"]
            assert (r["chosen_unsafe"], r["rejected_unsafe"]) == (False, False)
            assert r["group"] == ex.group
            if ex.ideal == "refuse":
                assert r["meta"]["pair_kind"] == "safe_over_off_topic" and r["chosen"] == ex.ideal_response
            else:
                assert r["meta"]["pair_kind"] == "on_topic_over_off_topic" and r["chosen"] == ex.helpful
                assert donor.topic != ex.topic  # off topic, not a near paraphrase of the right answer
    assert world.contrastive_pool("eval") == build_world(seed=0, size="tiny").contrastive_pool("eval")
