"""label@ATTRIBUTES: what a person labelled, as one-hot latents, so that a translator can be conditioned on
labels instead of another network (net2net's ``Labelator``).

``label@shape`` reads each item's ``attributes`` (a dataset's labels: shapes' colour, shape, size and
position; folder's class sub-folder) and writes the one-hot code of its shape; ``label@color+shape`` the
codes of both, side by side. The codes' order is the dataset's list of values for each attribute
(``ItemDataset.attribute_values``): extraction binds the expert to its dataset (``bound_to``), which records
the values as the expert's options, so a run rebuilds the same expert from its store alone. The "network"
is the table of codes, one identity matrix per attribute, so the store's digest changes with the values.

A label expert is unpaired translation's source: train ``label@shape`` -> an autoencoder, take a picture
of a circle, and recombine its residual (colour, size, position: what the label does not say) with the
label "square" (``Translator.edit``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from n2n.extract.experts import Expert, ExpertError

SEPARATOR = "+"  # between the attributes of a spec's layer: label@color+shape


class LabelExpert(Expert):
    """One-hot codes of the ``attributes`` of each item, from the dataset's ``values`` of each."""

    modality = "attributes"

    def __init__(self, attributes: Sequence[str], values: dict[str, list[str]] | None) -> None:
        self.attributes, self.values = tuple(attributes), values
        codes = nn.ParameterDict({name: nn.Parameter(torch.eye(len(values[name])), requires_grad=False)
                                  for name in attributes} if values is not None else {})
        layer = SEPARATOR.join(attributes)
        dim = sum(len(values[name]) for name in attributes) if values is not None else 0
        network = nn.Module()
        network.codes = codes
        network.register_buffer("anchor", torch.zeros(1))  # a device for an expert not yet bound to its values
        super().__init__("label", "label", "none", network, [layer], {layer: dim}, layer)

    @property
    def device(self) -> torch.device:
        return self.network.anchor.device

    def bound_to(self, dataset: object) -> LabelExpert:
        """This expert with the values of ``dataset``'s attributes (``ItemDataset.attribute_values``); an
        attribute the dataset does not label is an ExpertError that lists those it does."""
        known = dataset.attribute_values()
        missing = [name for name in self.attributes if name not in known]
        if missing:
            has = ", ".join(known) or "none (it labels nothing)"
            raise ExpertError(f"expert {self.spec}: dataset {dataset.name} has no attribute "
                              f"{', '.join(map(repr, missing))}; its attributes: {has}")
        bound = LabelExpert(self.attributes, {name: list(known[name]) for name in self.attributes})
        bound.plugin, bound.options = self.plugin, {"values": bound.values}
        return bound

    def _check_bound(self) -> dict[str, list[str]]:
        if self.values is None:
            raise ExpertError(f"expert {self.spec} has no values yet: it is bound to a dataset's labels when it "
                              "extracts one (n2n-extract --expert label@ATTRIBUTES --data NAME)")
        return self.values

    def rows(self, item: dict) -> list:
        """One row: the index of each attribute's value in its list."""
        values, labels = self._check_bound(), item["attributes"]
        try:
            return [[values[name].index(str(labels[name])) for name in self.attributes]]
        except (KeyError, ValueError) as err:
            raise ExpertError(f"expert {self.spec}: labels {labels} do not name a value of each of "
                              f"{', '.join(self.attributes)} ({err}); the values: {values}") from None

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(rows, dtype=torch.long)}

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        self._check_bound()
        codes = [self.network.codes[name][batch["index"][:, i]] for i, name in enumerate(self.attributes)]
        return {layers[0]: torch.cat(codes, dim=1)}

    def preprocess(self) -> dict:
        return {"values": self.values}

    def parse(self, text: str) -> dict[str, str]:
        """A label as a person writes it: ``square`` (one attribute), or ``shape=square,color=red``."""
        if "=" not in text:
            if len(self.attributes) != 1:
                raise ExpertError(f"label {text!r}: this run's labels have {len(self.attributes)} attributes; "
                                  f"write each, e.g. {','.join(f'{name}=...' for name in self.attributes)}")
            return {self.attributes[0]: text.strip()}
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        return {key.strip(): value.strip() for key, value in pairs}


def load(model: str | None, layer: str | None, weights: str | None,
         values: dict[str, list[str]] | None = None) -> LabelExpert:
    """label@ATTR[+ATTR...]; ``values`` (recorded by extraction) binds it to its dataset's labels."""
    if model is not None or weights is not None:
        raise ExpertError("label takes no model and no weights: label@ATTRIBUTES, e.g. label@shape or "
                          "label@color+shape")
    if not layer:
        raise ExpertError("label needs the attributes to read: label@ATTRIBUTES, e.g. label@shape or "
                          "label@color+shape")
    attributes = [name.strip() for name in layer.split(SEPARATOR)]
    if any(not name for name in attributes) or len(set(attributes)) != len(attributes):
        raise ExpertError(f"label@{layer}: name each attribute once, joined by {SEPARATOR!r} (label@color+shape)")
    if values is not None and any(name not in values for name in attributes):
        raise ExpertError(f"label@{layer}: its recorded values name {', '.join(values)} only")
    return LabelExpert(attributes, values)
