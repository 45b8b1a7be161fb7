"""The table of divergence modes (``opsd_mm.loss.modes``): it matches the config's names, the
JSD's endpoints resolve to the KL entries, each mode's terms equal hand values from the
formulas, each closed form equals autograd of its terms, and no loss module dispatches on the
mode's name any more."""

from __future__ import annotations

import ast
import math
import typing
from pathlib import Path

import pytest
import torch

from opsd_mm.config import LossConfig
from opsd_mm.loss import modes
from opsd_mm.loss.closed_form import divergence_and_grad, has_closed_form
from opsd_mm.loss.divergences import DIVERGENCES, divergence_terms
from opsd_mm.loss.fused import fused_divergence
from opsd_mm.loss.modes import MODES, DivergenceMode, mode_for

LOSS_DIR = Path(modes.__file__).resolve().parent

# Two tokens over a 3-entry vocabulary: teacher T, student S (probabilities).
T_3 = [[0.7, 0.2, 0.1], [0.15, 0.05, 0.8]]
S_3 = [[0.2, 0.5, 0.3], [0.3, 0.4, 0.3]]
BETAS = (0.1, 0.5, 0.9)


# ----------------------------------------------------------------------------- the table


def test_table_names_are_the_config_names():
    """Adding a mode without its ``LossConfig.divergence`` name (or the reverse) fails here."""
    literal = typing.get_args(typing.get_type_hints(LossConfig)["divergence"])
    assert set(literal) == set(MODES)
    assert DIVERGENCES == tuple(MODES)
    assert all(mode.name == name for name, mode in MODES.items())


def test_entries_are_consistent():
    for mode in MODES.values():
        assert (mode.terms is None) == mode.sampled_token_only, mode.name
        assert mode.terms is not None or mode.terms_and_grad is None, mode.name
    with pytest.raises(ValueError, match="sampled"):
        DivergenceMode("neither", None, None)
    with pytest.raises(ValueError, match="sampled"):
        DivergenceMode("both", modes.forward_kl_terms, None, sampled_token_only=True)


def test_mode_for_resolves_the_jsd_endpoints():
    assert mode_for("jsd", 0.0) is MODES["forward_kl"]
    assert mode_for("jsd", 1.0) is MODES["reverse_kl"]
    for beta in (1e-4, 0.5, 1 - 1e-4):
        assert mode_for("jsd", beta) is MODES["jsd"]
    for name in ("forward_kl", "reverse_kl", "sampled_pg"):  # beta means nothing to these
        for beta in (0.0, 0.5, 1.0):
            assert mode_for(name, beta) is MODES[name]
    with pytest.raises(ValueError, match="'chi2' is not one of"):
        mode_for("chi2", 0.5)


# ----------------------------------------------------------------------------- hand values


def _forward_kl_hand(t, s, beta):
    return [tv * (math.log(tv) - math.log(sv)) for tv, sv in zip(t, s)]


def _reverse_kl_hand(t, s, beta):
    return [sv * (math.log(sv) - math.log(tv)) for tv, sv in zip(t, s)]


def _jsd_hand(t, s, beta):
    out = []
    for tv, sv in zip(t, s):
        mv = beta * tv + (1 - beta) * sv  # the mixture, in probability space
        out.append(
            beta * tv * (math.log(tv) - math.log(mv))
            + (1 - beta) * sv * (math.log(sv) - math.log(mv))
        )
    return out


# Per vocabulary mode: its per-entry terms from the formula, as a function of (T, S, beta) rows.
HAND = {"forward_kl": _forward_kl_hand, "reverse_kl": _reverse_kl_hand, "jsd": _jsd_hand}


def _logp(rows):
    return torch.tensor([[math.log(x) for x in r] for r in rows], dtype=torch.float64)


def test_every_vocabulary_mode_has_hand_values():
    assert set(HAND) == {name for name, mode in MODES.items() if mode.terms is not None}


@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("beta", BETAS)
def test_terms_equal_hand_values(name, beta):
    terms_NK = MODES[name].terms(_logp(S_3), _logp(T_3), beta)
    expected = [HAND[name](t, s, beta) for t, s in zip(T_3, S_3)]
    assert terms_NK.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-14) for row in expected]


def test_jsd_hand_endpoints_are_the_kls():
    """The endpoint rule: at beta 0 / 1 the loss runs forward / reverse KL's terms (the JSD
    formula itself would give 0 there)."""
    s, t = _logp(S_3), _logp(T_3)
    for beta, hand in ((0.0, _forward_kl_hand), (1.0, _reverse_kl_hand)):
        expected = [hand(tr, sr, beta) for tr, sr in zip(T_3, S_3)]
        got = divergence_terms(s, t, "jsd", beta).tolist()
        assert got == [pytest.approx(row, rel=1e-12, abs=1e-14) for row in expected]


def test_sampled_token_only_mode_has_no_terms():
    with pytest.raises(ValueError, match="no vocabulary terms"):
        divergence_terms(_logp(S_3), _logp(T_3), "sampled_pg", 0.5)


# ----------------------------------------------------------------------------- closed forms


def _closed_form_cases():
    for name, mode in MODES.items():
        if mode.terms_and_grad is None:
            continue
        for beta in BETAS if name == "jsd" else (0.5,):
            yield pytest.param(name, beta, id=f"{name}-{beta}")


@pytest.mark.parametrize(("name", "beta"), list(_closed_form_cases()))
@pytest.mark.parametrize(("n", "v"), [(1, 1), (3, 5), (7, 64), (2, 301)])
def test_terms_and_grad_equal_autograd_of_terms(name, beta, n, v):
    mode = MODES[name]
    g = torch.Generator().manual_seed(n * 1000 + v)
    s_NV = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, -1)
    t_NV = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, -1)
    S_NV = s_NV.exp()
    s_free_NV = s_NV.clone().requires_grad_()
    ref_NV = mode.terms(s_free_NV, t_NV, beta)
    (g_ref_NV,) = torch.autograd.grad(ref_NV.sum(), s_free_NV)

    sides = [s_NV.clone(), t_NV.clone(), t_NV.exp()]
    S_before_NV = S_NV.clone()
    terms_NV, g_NV = mode.terms_and_grad(sides, S_NV, beta)
    assert sides == []  # handed over: the closed form owns (and overwrites) them
    assert torch.equal(S_NV, S_before_NV)  # read, never written
    torch.testing.assert_close(terms_NV, ref_NV.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_NV, g_ref_NV, rtol=1e-12, atol=1e-14)


def test_a_mode_without_closed_form_takes_autograd(monkeypatch):
    """``terms_and_grad=None`` is a complete mode: has_closed_form says no, the fused path
    takes each chunk's gradient by autograd through ``terms``, and the result is the closed
    form's (dispatch by the entry's fields, not by the name)."""
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 9, 8, 33
    h_NH = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    ht_NH = h_NH + 0.5 * torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w_VH = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    ids_N = torch.randint(0, vocab, (n,), generator=g)
    cfg = LossConfig(divergence="forward_kl")

    def run():
        x_NH = h_NH.clone().requires_grad_()
        loss, _ = fused_divergence(x_NH, ht_NH, w_VH, ids_N, cfg, chunk_size=4)
        return loss.detach(), torch.autograd.grad(loss, x_NH)[0]

    assert has_closed_form(cfg, vocab)
    ref = run()
    monkeypatch.setitem(
        MODES, "forward_kl", DivergenceMode("forward_kl", modes.forward_kl_terms, None)
    )
    assert not has_closed_form(cfg, vocab)
    with pytest.raises(ValueError, match="no terms_and_grad"):
        divergence_and_grad(h_NH @ w_VH.T, ht_NH @ w_VH.T, ids_N, cfg)
    for a, b in zip(run(), ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- no name dispatch


def _is_divergence(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "divergence") or (
        isinstance(node, ast.Attribute) and node.attr == "divergence"
    )


def _is_str_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_str_literal(e) for e in node.elts)
    return False


def _name_tests(source: str) -> list[int]:
    """Line numbers where ``divergence`` (a name or an attribute) is compared with a string
    literal: ==, != or in / not in a literal collection."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, a, b in zip(node.ops, operands, operands[1:]):
            if not isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
                continue
            if (_is_divergence(a) and _is_str_literal(b)) or (
                _is_divergence(b) and _is_str_literal(a)
            ):
                lines.append(node.lineno)
    return lines


def test_the_check_catches_name_tests():
    for bad in (
        'cfg.divergence == "sampled_pg"',
        'x = divergence != "jsd"',
        'y = "jsd" == cfg.divergence',
        'z = a and divergence in ("jsd", "forward_kl")',
    ):
        assert _name_tests(bad), bad
    assert not _name_tests("mode_for(cfg.divergence, cfg.beta).sampled_token_only")


def test_no_loss_module_dispatches_on_the_mode_name():
    found = {
        path.name: lines
        for path in sorted(LOSS_DIR.glob("*.py"))
        if (lines := _name_tests(path.read_text()))
    }
    assert not found, f"string tests on the divergence name (use mode_for's fields): {found}"
