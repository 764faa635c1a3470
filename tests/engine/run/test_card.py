"""The model card as a Hub user reads it: front matter parsed as YAML, and the body's links, notes and title."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from recipekit.engine import load_recipe
from recipekit.engine.cli import main
from recipekit.engine.core.tags import VOCABULARY
from recipekit.engine.recipe.standalone import standalone
from recipekit.engine.run import card
from recipekit.engine.run.card import render_card
from tests.tiny import make_model, put_in_cache, write_recipe

COMMIT = "1" * 40


@pytest.fixture
def models(tmp_path, llama):
    """Two compatible 6-layer models beside the recipe: ./a (the llama fixture) and ./b."""
    shutil.copytree(llama, tmp_path / "a")
    make_model(tmp_path / "b", layers=6, seed=3)
    return tmp_path


@pytest.fixture
def hub_cache(tmp_path, llama, monkeypatch):
    """org/tiny in an offline Hub cache at commit 111..., with a model card stating its license."""
    source = tmp_path / "hub-source"
    shutil.copytree(llama, source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n\n# tiny\n")
    put_in_cache(tmp_path / "cache", "org/tiny", source, COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    return tmp_path


def card_of(folder, text: str) -> tuple[dict, str]:
    """The card of the recipe `text` (written in `folder`) as its output would carry it: front matter, body."""
    loaded = load_recipe(write_recipe(folder, text))
    plan = loaded.plan()
    written = render_card(plan, loaded.recipe, loaded.text, standalone(loaded.text, loaded.recipe, loaded.base_dir))
    _, front, body = written.split("---\n", 2)
    return yaml.safe_load(front), body


def test_a_local_pruned_model(models):
    front, body = card_of(models, """
        recipe: 1
        models: {m: ./a}
        steps: [{op: drop_layers, model: m, layers: [[1, 3]]}]
        """)
    assert front == {"library_name": "transformers", "tags": ["recipekit", "pruned"]}  # no Hub id, no license
    assert body.startswith("\n# m with layers 1-2 dropped\n")
    assert "No input has a Hub id (`m` is a local directory), so the card names no `base_model`." in body
    assert "No license is given here: `m` states none" in body
    assert "github.com" not in body and "A recipekit model" not in body


def test_a_hub_input_is_the_base_model_and_links_to_its_page(models, hub_cache):
    front, body = card_of(models, """
        recipe: 1
        models: {m: org/tiny}
        steps: [{op: drop_layers, model: m, layers: [0]}]
        """)
    assert front["base_model"] == ["org/tiny"] and front["base_model_relation"] == "finetune"
    assert front["license"] == "apache-2.0"  # from its card's front matter
    assert (f"[`org/tiny`](https://huggingface.co/org/tiny) at commit "
            f"[`{COMMIT}`](https://huggingface.co/org/tiny/tree/{COMMIT})") in body
    assert "`base_model_relation: finetune`" in body and "nothing was trained" in body

    front, body = card_of(models, f"""
        recipe: 1
        models: {{m: 'org/tiny@{COMMIT}', local: ./b}}
        steps: [{{op: merge, method: linear, parameters: {{weight: 1}}, models: [{{model: m}}, {{model: local}}]}}]
        """)
    assert front["base_model"] == ["org/tiny"] and front["base_model_relation"] == "merge"
    assert front["tags"] == ["recipekit", "merge"] and "license" not in front  # ./b states none
    assert f"[`org/tiny@{COMMIT}`](https://huggingface.co/org/tiny/tree/{COMMIT})" in body  # the pinned revision
    assert "`base_model` names the Hub inputs only: `local` is a local directory, with no Hub id." in body
    assert "No license is given here: `local` states none" in body


def test_the_license_is_carried_only_when_every_input_states_the_same(models):
    recipe = """
        recipe: 1
        models: {a: ./a, b: ./b}
        steps: [{op: merge, method: linear, parameters: {weight: 1}, models: [{model: a}, {model: b}]}]
        """
    (models / "a" / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\nbody\n")
    config = json.loads((models / "b" / "config.json").read_text())
    (models / "b" / "config.json").write_text(json.dumps({**config, "license": "mit"}))
    front, body = card_of(models, recipe)
    assert front["license"] == "mit" and "License: `mit`, as every input states." in body

    (models / "a" / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    front, body = card_of(models, recipe)
    assert "license" not in front
    assert "the inputs state different ones (`a` apache-2.0, `b` mit)" in body

    other = "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n"
    (models / "a" / "README.md").write_text(other)
    (models / "b" / "README.md").write_text(other)  # the card comes before the config
    front, _ = card_of(models, recipe)
    assert (front["license"], front["license_name"], front["license_link"]) == ("other", "tiny-license", "LICENSE")

    for unreadable in ("license: mit\n",  # no front matter
                       "---\nlicense: mit\n" + "x: 1\n" * 20_000 + "---\n",  # not closed within what is read
                       "---\nlicense: !!python/object:os.system mit\n---\n",  # not safe YAML
                       "---\nlicense: [mit]\n---\n"):  # not a license identifier
        (models / "a" / "README.md").write_text(unreadable)
        front, body = card_of(models, recipe)
        assert "license" not in front and "No license is given here: `a` states none" in body


def test_the_lock_covers_the_card_a_license_came_from(models, capsys):
    (models / "a" / "README.md").write_text("---\nlicense: mit\n---\n")
    recipe = write_recipe(models, "recipe: 1\nmodels: {a: ./a}\nsteps: [{op: drop_layers, model: a, layers: [0]}]\n")
    assert main(["run", str(recipe), "-o", str(models / "out"), "-q"]) == 0
    assert "README.md" in json.loads((models / "out" / "recipe.lock").read_text())["inputs"]["a"]["files"]
    shutil.copy(models / "out" / "recipe.lock", models / "recipe.lock")
    (models / "a" / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(models / "again"), "-q", "--locked"]) == 2
    assert "input 'a': README.md changed" in capsys.readouterr().err


@pytest.mark.parametrize(("steps", "tags"), [
    ("[{op: drop_layers, model: a, layers: [1]}]", ["pruned"]),
    ("[{op: slice_layers, slices: [{model: a, range: [0, 2]}, {model: a, range: [4, 6]}]}]", ["pruned"]),
    ("[{op: slice_layers, slices: [{model: a, range: [0, 6]}]}]", []),
    ("[{op: slice_layers, slices: [{model: a, range: [0, 4]}, {model: a, range: [3, 6]}]}]", ["frankenmerge"]),
    ("[{op: slice_layers, slices: [{model: a, range: [0, 3]}, {model: b, range: [3, 6]}]}]",
     ["frankenmerge", "merge"]),
    ("[{op: merge, method: linear, parameters: {weight: 1}, models: [{model: a}, {model: b}]}]", ["merge"]),
    ("[{id: moe, op: stack_experts, base: a, experts: [{model: a}, {model: a}]},"
     " {op: init_gates, model: moe, mode: random}]", ["moe", "upcycled"]),
    ("[{id: moe, op: stack_experts, base: a, experts: [{model: a}, {model: b}]},"
     " {op: init_gates, model: moe, mode: random}]", ["moe", "merge"]),
])
def test_the_same_kind_of_step_gets_the_same_tags(models, steps, tags):
    front, _ = card_of(models, f"recipe: 1\nmodels: {{a: ./a, b: ./b}}\nsteps: {steps}\n")
    assert front["tags"] == ["recipekit", *tags]
    assert set(front["tags"]) <= set(VOCABULARY)


@pytest.mark.parametrize(("steps", "title"), [
    ("[{op: drop_layers, model: a, layers: [1, [3, 5]]}]", "a with layers 1, 3-4 dropped"),
    ("[{op: merge, method: ties, base: a, models: [{model: b, weight: 1, density: 0.5}]}]",
     "a TIES merge of b onto a"),
    ("[{op: merge, method: slerp, base: a, parameters: {t: 0.5}, models: [{model: a}, {model: b}]}]",
     "a SLERP merge of b onto a"),
    ("[{id: m, op: merge, method: linear, parameters: {weight: 1}, models: [{model: a}, {model: b}]},"
     " {op: drop_layers, model: m, layers: [0]}]", "a linear merge of a and b with layer 0 dropped"),
    ("[{op: slice_layers, slices: [{model: a, range: [0, 3]}, {model: b, range: [3, 6]}]}]",
     "a frankenmerge of a and b"),
    ("[{op: slice_layers, slices: [{model: a, range: [0, 4]}, {model: a, range: [3, 4]}]}]",
     "a restacked as layers 0-3 + 3"),
    ("[{id: moe, op: stack_experts, base: a, experts: [{model: a}, {model: b}]},"
     " {op: init_gates, model: moe, mode: random}]", "a Mixture of Experts of a and b over a with random routers"),
])
def test_a_card_without_description_says_what_was_built(models, steps, title):
    _, body = card_of(models, f"recipe: 1\nmodels: {{a: ./a, b: ./b}}\nsteps: {steps}\n")
    assert body.startswith(f"\n# {title}\n")


def test_the_project_link_comes_from_the_package_metadata(models, monkeypatch):
    recipe = "recipe: 1\nmodels: {a: ./a}\nsteps: [{op: drop_layers, model: a, layers: [0]}]\n"
    _, body = card_of(models, recipe)
    assert re.search(r"^Built with recipekit \S+ from the recipe below\.$", body, re.M)  # pyproject names no URL

    class Metadata:
        def get_all(self, name):
            assert name == "Project-URL"
            return ["Documentation, https://docs.example.org", "Homepage, https://example.org/recipekit"]

    monkeypatch.setattr(card, "metadata", lambda package: Metadata())
    _, body = card_of(models, recipe)
    assert "Built with [recipekit](https://example.org/recipekit) " in body


@pytest.mark.parametrize("name", ["frankenmerge", "story-drop-by-angular"])
def test_the_rebuild_line_rebuilds_from_the_output_folder(tmp_path, monkeypatch, capsys, name):
    """The card's exact line, run inside the output, rebuilds the model; nothing is looked up on the Hub."""
    import huggingface_hub

    from recipekit.engine.io import hub
    from tests.tiny import DEMO

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(DEMO / f"{name}.yaml", project)
    shutil.copy(DEMO / "heldout.txt", project)
    for model in ("llama-a", "llama-b", "tiny-story"):
        shutil.copytree(DEMO / "models" / model, project / "models" / model)
    monkeypatch.chdir(tmp_path)
    assert main(["run", f"project/{name}.yaml", "-o", "out", "-q"]) == 0
    assert main(["run", f"project/{name}.yaml", "-o", "again", "-q"]) == 0
    out = tmp_path / "out"
    for file in ("recipe.yaml", "README.md"):  # the same recipe writes the same bytes, whatever -o is
        assert (out / file).read_bytes() == (tmp_path / "again" / file).read_bytes()

    line = re.search(r"In this folder, `(recipe run [^`]+)` rebuilds this model\.", (out / "README.md").read_text())
    assert line is not None
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_hub(*args, **kwargs):
        raise AssertionError("the rebuild looked on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(hub, "unreachable", no_hub)
    monkeypatch.chdir(out)
    assert main(line.group(1).split()[1:] + ["-q"]) == 0, capsys.readouterr().err

    rebuilt = tmp_path / "rebuilt"
    assert sorted(p.name for p in rebuilt.iterdir()) == sorted(p.name for p in out.iterdir())
    for file in sorted(out.iterdir()):
        if file.name not in ("README.md", "recipe.lock"):  # those name the inputs as the recipe does
            assert (rebuilt / file.name).read_bytes() == file.read_bytes(), file.name
    front = (out / "README.md").read_text().split("---\n")[1]
    assert (rebuilt / "README.md").read_text().split("---\n")[1] == front
    original, again = (json.loads((folder / "recipe.lock").read_text()) for folder in (out, rebuilt))
    assert {n: e["files"] for n, e in again["inputs"].items()} == {n: e["files"] for n, e in original["inputs"].items()}
    texts = [sorted(map(json.dumps, lock.get("files", {}).values())) for lock in (original, again)]
    assert texts[0] == texts[1]  # the same text, now named by its absolute path
