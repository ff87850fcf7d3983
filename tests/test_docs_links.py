"""The docs cannot rot: every relative link and #anchor in README.md, CONTRIBUTING.md and
docs/*.md resolves (GitHub's heading slugs), the README stays under 12 KB with its headline table
equal to what the results render, and the README's training-loop example runs on the CPU."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024

if not README.is_file():
    pytest.skip("no source checkout", allow_module_level=True)

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\]\n]|\\\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links and code marks dropped) lower-cased,
    punctuation other than '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [m.group(1) for m in LINK.finditer(text)]


def test_slugs_follow_githubs_rules():
    assert github_slug("Check it: `marn-fast info`") == "check-it-marn-fast-info"
    assert github_slug("C++ users: CMake + libtorch") == "c-users-cmake--libtorch"
    assert github_slug("The GPU checks: `scripts/gpu_check.sh`") == "the-gpu-checks-scriptsgpu_checksh"
    assert github_slug("What this says about the paper's claims") == "what-this-says-about-the-papers-claims"
    assert github_slug("Options (MARNConfig)") == "options-marnconfig"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    assert page.is_file(), page
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file {resolved}")
        elif not resolved.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_docs_pages_exist_and_are_linked_from_the_readme():
    expected = {"model", "performance", "data", "codiesp", "cli", "gpu", "install"}
    assert {p.stem for p in (REPO / "docs").glob("*.md")} == expected
    targets = set(links(README))
    assert {f"docs/{name}.md" for name in expected} <= targets and "CONTRIBUTING.md" in targets


def test_readme_fits_on_a_screen():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (move detail to docs/)"


def _load_headline(monkeypatch):
    spec = importlib.util.spec_from_file_location("headline", REPO / "benchmarks" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_readme_headline_table_is_generated_from_the_results(monkeypatch):
    headline = _load_headline(monkeypatch)
    assert headline.current_block(README) == headline.render(), \
        "README.md's headline table differs from benchmarks/results/: run `python benchmarks/headline.py`"


def _readme_example() -> str:
    return _example(README, "<!-- the example")


def _example(page: Path, marker: str) -> str:
    """The first ```python block after `marker` on `page`."""
    text = page.read_text(encoding="utf-8")
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_model_page_layer_example_runs_on_the_cpu():
    """docs/model.md's LabelWiseAttention example, verbatim: logits, a loss with gradients for the
    encoder and the head, and evidence tokens inside each document."""
    namespace: dict = {}
    exec(compile(_example(REPO / "docs" / "model.md", "<!-- the layer example"), "docs/model.md example", "exec"),
         namespace)
    head, lengths = namespace["head"], namespace["lengths"]
    assert namespace["logits"].shape == (4, 50) and torch.isfinite(namespace["loss"])
    assert all(p.grad is not None for p in [*head.parameters(), *namespace["encoder"].parameters()])
    tokens = namespace["tokens"]
    assert tokens.shape == (4, 2, 5) and ((tokens >= 0) & (tokens < lengths[:, None, None])).all()


def test_readme_training_loop_example_runs_on_the_cpu(monkeypatch):
    """The README's example, verbatim, on two batches of random notes. torch.compile runs with
    Dynamo's "eager" backend here: the model is traced and run through Dynamo's graphs, without
    Inductor's C++ code generation, which takes minutes on a small shared CPU (the example with
    Inductor was run by hand). Both batches have one padded length: one trace, no recompile."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager", **kw))
    gen = torch.Generator().manual_seed(0)

    def batch(lengths, n=24):
        lengths = torch.tensor(lengths)
        tokens = torch.randint(2, 5000, (len(lengths), n), generator=gen)
        tokens[torch.arange(n)[None, :] >= lengths[:, None]] = 0
        return (tokens, lengths, (torch.rand(len(lengths), 50, generator=gen) < 0.1).float(),
                (torch.rand(len(lengths), 20, generator=gen) < 0.2).float())

    namespace = {"loader": [batch([24, 17, 5]), batch([24, 24, 9])]}
    torch._dynamo.reset()
    try:
        exec(compile(_readme_example(), "README.md example", "exec"), namespace)
    finally:
        torch._dynamo.reset()
    model, loss = namespace["model"], namespace["loss"]
    assert torch.isfinite(loss) and loss.requires_grad
    assert namespace["out"].icd_logits.shape == (3, 50) and namespace["out"].ccs_logits.shape == (3, 20)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
