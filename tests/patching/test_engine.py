"""The batched restoration engine: its invariants, packing independence and the selected mask."""

import pytest
import torch

from vitlens_patch.patching.engine import run_restore
from vitlens_patch.patching.sites import Site


@pytest.fixture
def pair(tiny_pair):
    return tiny_pair


def test_restoring_everything_gives_clean_and_nothing_gives_corrupted(tiny_model, pair):
    clean, corrupted = pair
    cells = [
        (Site("blocks.0.hook_resid_pre"),),  # every token entering block 0: the whole clean run
        (Site("blocks.1.hook_resid_post"),),  # every token leaving the last block
        (Site("blocks.0.hook_attn_out", ()),),  # no token at all
    ]
    out = run_restore(tiny_model, clean, corrupted, cells, score="logit", progress=False)
    assert out.restored_score.shape == (2, 3)
    torch.testing.assert_close(out.restored_score[:, 0], out.clean_score, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.restored_score[:, 1], out.clean_score, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.restored_score[:, 2], out.corrupted_score, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.effects, out.restored_score - out.corrupted_score[:, None])


def test_clean_and_corrupted_scores_are_the_plain_runs(tiny_model, pair):
    clean, corrupted = pair
    out = run_restore(tiny_model, clean, corrupted, [(Site("blocks.1.hook_mlp_out"),)], score="logprob",
                      target=3, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(out.clean_score, tiny_model(clean).log_softmax(-1)[:, 3])
        torch.testing.assert_close(out.corrupted_score, tiny_model(corrupted).log_softmax(-1)[:, 3])
    assert out.target.tolist() == [3, 3]


def test_rows_per_pass_does_not_change_scores(tiny_model, pair):
    clean, corrupted = pair
    cells = [(Site(f"blocks.{layer}.hook_resid_post", (position,)),) for layer in range(2) for position in range(5)]
    one = run_restore(tiny_model, clean, corrupted, cells, rows_per_pass=1, progress=False)
    many = run_restore(tiny_model, clean, corrupted, cells, rows_per_pass=7, progress=False)
    torch.testing.assert_close(one.restored_score, many.restored_score, atol=1e-6, rtol=0)


def test_selected_restores_only_the_chosen_pairs(tiny_model, pair):
    clean, corrupted = pair
    cells = [(Site("blocks.0.hook_attn_out"),), (Site("blocks.1.hook_mlp_out"),)]
    selected = torch.tensor([[True, False], [False, True]])
    full = run_restore(tiny_model, clean, corrupted, cells, progress=False)
    part = run_restore(tiny_model, clean, corrupted, cells, selected=selected, progress=False)
    assert torch.isnan(part.restored_score[~selected]).all()
    torch.testing.assert_close(part.restored_score[selected], full.restored_score[selected])
