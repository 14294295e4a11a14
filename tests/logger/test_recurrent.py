"""nn.LSTM / nn.GRU / nn.RNN: exact per-example gradients against a float64 oracle through the same batch forward.

Every configuration the modules offer (batch_first True/False, several layers, bidirectional, proj_size, given
initial states, packed sequences of different lengths), layers after the recurrent module (the layout follows it),
``layers=`` exclusion of a recurrent module in the middle, and the refusals.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_layers_exact, log_same_forward
from tolerance import chain_length
from torch import nn

N, T, V = 3, 5, 20
LENGTHS = torch.tensor([5, 2, 4])


class Tagger(nn.Module):
    """Embedding → recurrent module → per-position head; the last state feeds the head too."""

    def __init__(self, cell, batch_first=True, packed=False, with_state=False, **kw):
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.rnn = cell(8, 6, batch_first=batch_first, **kw)
        self.batch_first, self.packed, self.with_state = batch_first, packed, with_state
        out = (kw.get("proj_size") or 6) * (2 if kw.get("bidirectional") else 1)
        self.head = nn.Linear(out, 4)
        self.init = nn.Linear(8, 6 * kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1))

    def forward(self, x):
        h = self.emb(x)
        hx = None
        if self.with_state:  # initial state computed from the example (a seq2seq decoder's)
            h0 = self.init(h.mean(1)).view(x.shape[0], -1, 6).transpose(0, 1).contiguous()
            hx = (h0, torch.zeros_like(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        if not self.batch_first:
            h = h.transpose(0, 1)
        if self.packed:
            p = nn.utils.rnn.pack_padded_sequence(h, LENGTHS, batch_first=self.batch_first, enforce_sorted=False)
            o, state = self.rnn(p, hx)
            o, _ = nn.utils.rnn.pad_packed_sequence(o, batch_first=self.batch_first, total_length=T)
        else:
            o, state = self.rnn(h, hx)
        if not self.batch_first:
            o = o.transpose(0, 1)
        last = state[0] if isinstance(state, tuple) else state
        return self.head(o) + last.sum(0)[:, None, :1]


def tagger_loss(model):
    g = torch.Generator().manual_seed(1)
    ids, tags = torch.randint(0, V, (N, T), generator=g), torch.randint(0, 4, (N, T), generator=g)
    return F.cross_entropy(model(ids).transpose(1, 2), tags, reduction="none").mean(1)


CONFIGS = {
    "plain": {},
    "seq_first": {"batch_first": False},
    "bi_2layers": {"bidirectional": True, "num_layers": 2},
    "seq_first_bi_3layers": {"batch_first": False, "bidirectional": True, "num_layers": 3},
    "packed_bi": {"packed": True, "bidirectional": True, "num_layers": 2},
    "packed_seq_first": {"packed": True, "batch_first": False},
    "state_bi": {"with_state": True, "bidirectional": True},
    "packed_state": {"packed": True, "with_state": True, "num_layers": 2},
}


CASES = [(nn.LSTM, c) for c in CONFIGS] + [(cell, c) for cell in (nn.GRU, nn.RNN)
                                           for c in ("seq_first_bi_3layers", "packed_bi", "state_bi")]


@pytest.mark.parametrize(("cell", "config"), CASES, ids=[f"{cell.__name__}-{c}" for cell, c in CASES])
def test_recurrent_layers_are_exact(cell, config, tmp_path):
    torch.manual_seed(0)
    model = Tagger(cell, **CONFIGS[config])
    ds, grads = log_same_forward(model, tagger_loss, tmp_path / "s.zarr")
    assert sorted(p for layer in ds.attrs["gradcoh_layers"] for p in layer["params"]) == sorted(grads)
    assert_layers_exact(ds, grads, n=T * chain_length(model, positions=T))  # backprop through T steps


def test_lstm_projection_and_relu_rnn(tmp_path):
    torch.manual_seed(1)
    model = Tagger(nn.LSTM, proj_size=3, num_layers=2, bidirectional=True)
    ds, grads = log_same_forward(model, tagger_loss, tmp_path / "a.zarr")
    assert_layers_exact(ds, grads, n=T * chain_length(model, positions=T))  # backprop through T steps
    model = Tagger(nn.RNN, nonlinearity="relu", bias=False, packed=True)
    ds, grads = log_same_forward(model, tagger_loss, tmp_path / "b.zarr")
    assert_layers_exact(ds, grads, n=T * chain_length(model, positions=T))  # backprop through T steps


def test_excluding_the_lstm_keeps_the_layers_around_it(tmp_path):
    """layers= leaves the LSTM out; the embedding before it and the head after it stay exact."""
    torch.manual_seed(2)
    model = Tagger(nn.LSTM, batch_first=False, bidirectional=True)
    ds, grads = log_same_forward(model, tagger_loss, tmp_path / "s.zarr", layers=("emb", "head"))
    assert [layer["name"] for layer in ds.attrs["gradcoh_layers"]] == ["emb", "head"]
    assert_layers_exact(ds, grads, n=T * chain_length(model, positions=T))  # backprop through T steps


def test_frozen_recurrent_weights(tmp_path):
    torch.manual_seed(3)
    model = Tagger(nn.GRU, bidirectional=True)
    model.rnn.weight_hh_l0.requires_grad_(False)
    model.rnn.bias_ih_l0_reverse.requires_grad_(False)
    ds, grads = log_same_forward(model, tagger_loss, tmp_path / "s.zarr")
    assert_layers_exact(ds, grads, n=T * chain_length(model, positions=T))  # backprop through T steps


def test_dropout_between_layers_in_train_mode_is_refused(tmp_path):
    model = Tagger(nn.LSTM, num_layers=2, dropout=0.3).train()
    with pytest.raises(ValueError, match=r"dropout=0.3 between layers.*layers=\.\.\."):
        log_same_forward(model, tagger_loss, tmp_path / "s.zarr")


def test_packed_sequences_not_from_the_batch_are_refused(tmp_path):
    """pack_sequence over per-example slices: the order of the packed sequences is not known, so it is refused."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 3, batch_first=True)

        def forward(self, x):
            packed = nn.utils.rnn.pack_sequence([x[2, :3], x[0], x[1, :2]], enforce_sorted=False)
            return nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)[0].sum((1, 2))

    x = torch.randn(N, T, 4)
    with pytest.raises(ValueError, match="not the examples of the batch in order"):
        log_same_forward(Model(), lambda m: m(x.to(next(m.parameters()).dtype)), tmp_path / "s.zarr")
