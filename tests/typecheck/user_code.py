"""A user's code over torchfg's public API, as the README and docs use it, for a type checker.

tests/test_typing.py runs mypy on this file alone, with torchfg found as an installed package (its
``py.typed`` marker, PEP 561), and requires no error: what a user's mypy or pyright reports must
not change for the worse. ``assert_type`` pins the return types that matter; a call that a user
may rightly write and that the annotations refuse fails the run too. It also runs as a plain
script (small sizes, CPU, a few seconds), so that every type pinned here is the one the code
returns.

Module calls (``loss(x, y)``) are ``Any`` to a type checker (``nn.Module.__call__``), so the
return types of modules are checked through ``.forward``.

Not collected by pytest (not a ``test_*.py`` file).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import torchfg
import torchfg.functional as TF
from torchfg.data import EpisodicSampler, PKSampler, split_episode
from torchfg.datasets import HashedBagOfWordsEncoder, ProductSample, SyntheticProducts
from torchfg.distributed import all_gather_no_grad, all_gather_with_grad, gather_batch, world_size
from torchfg.fewshot import embed_dataset, evaluate
from torchfg.heads import DINOHead, MultiLabelHead, PrototypicalHead
from torchfg.layers import MultiCropWrapper, SemanticChannelAttention, SemanticFusion, wrap_backbone
from torchfg.losses import AdaptiveTripletLoss, CrossBatchMemory, DINOLoss, TripletMarginLoss
from torchfg.metrics import (
    RetrievalMetrics,
    few_shot_accuracy,
    map_at_r,
    multilabel_auc,
    recall_at_k,
    relative_improvement,
    retrieval_metrics,
)
from torchfg.miners import BatchHardMiner, SemiHardMiner, TripletMarginMiner
from torchfg.utils import cosine_schedule, ema_update_

if sys.version_info >= (3, 11):
    from typing import assert_type
else:
    from typing_extensions import assert_type

Tensor = torch.Tensor
torch.manual_seed(0)

# ----------------------------------------------------------------------------- distances, k-NN
x = torch.randn(32, 16, requires_grad=True)
labels = torch.arange(8).repeat_interleave(4)
d = torchfg.pairwise_distance(x, metric="cosine")
assert_type(d, Tensor)
d.mean().backward()
distances, indices = torchfg.knn(x.detach(), k=5, metric="euclidean", exclude_self=True)
assert_type(distances, Tensor)
assert_type(indices, Tensor)

# ----------------------------------------------------------------------------- losses and miners
loss_fn = TripletMarginLoss(margin=0.2, mining="batch_hard")
miner = BatchHardMiner(collect_stats=True)
triplets = miner.forward(x, labels)
assert_type(triplets, tuple[Tensor, Tensor, Tensor])
anchors, positives, negatives = miner(x, labels)  # the usual call (Any to a type checker)
loss = loss_fn.forward(x, labels, triplets)
assert_type(loss, Tensor)
loss_fn(x, labels, (anchors, positives, negatives)).backward()
assert_type(miner.num_triplets, int)
# Statistics are None until a miner with collect_stats=True has run.
assert_type(miner.pos_pair_dist, float | None)
if miner.pos_pair_dist is not None and miner.neg_pair_dist is not None:
    gap: float = miner.neg_pair_dist - miner.pos_pair_dist
assert isinstance(miner.pos_pair_dist, float) and SemiHardMiner().pos_pair_dist is None
semi = SemiHardMiner()
assert_type(semi.forward(x.detach(), labels), tuple[Tensor, Tensor, Tensor])
margin_miner = TripletMarginMiner(margin=0.2, type_of_triplets="semihard", collect_stats=True)
loss_fn(x, labels, margin_miner(x, labels))
assert_type(margin_miner.avg_triplet_margin, float | None)
pairs = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([4, 5]))  # PML pair tuple
assert_type(TF.triplet_margin_loss(x, labels, pairs, margin=0.2), Tensor)
assert_type(TF.mine_triplets(x, labels, strategy="semi_hard"), tuple[Tensor, Tensor, Tensor])

encoder = HashedBagOfWordsEncoder(dim=32)
text = encoder.encode(["red striped shirt with white collar"] * 32)
assert_type(text, Tensor)
assert_type(encoder("red shirt"), Tensor)
atl = AdaptiveTripletLoss(base_margin=0.1, margin_scale=0.5)
assert_type(atl.forward(x, labels, text), Tensor)
assert_type(TF.adaptive_triplet_loss(x, labels, text, base_margin=0.1), Tensor)

# ----------------------------------------------------------------------------- cross-batch memory
model = nn.Linear(32, 16)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
xbm = CrossBatchMemory(TripletMarginLoss(margin=0.2), embedding_size=16, memory_size=64)
for step in range(3):
    embeddings = model(torch.randn(16, 32))
    step_labels = torch.randint(0, 4, (16,))
    memory_loss = xbm.forward(embeddings, step_labels)
    assert_type(memory_loss, Tensor)
    optimizer.zero_grad()
    memory_loss.backward()
    optimizer.step()
assert_type(xbm.size, int)
assert_type(xbm.has_been_filled, bool)
assert_type(xbm.embedding_memory, Tensor)
filled: Tensor = xbm.embedding_memory[: xbm.size]
assert_type(xbm.text_memory, Tensor | None)
assert xbm.text_memory is None  # a TripletMarginLoss keeps no text
xbm_text = CrossBatchMemory(AdaptiveTripletLoss(), embedding_size=16, memory_size=64, text_size=32)
xbm_text(x, labels, text_embeddings=text)
xbm_text.forward(x, labels, indices_tuple=pairs, text_embeddings=text)
memory: list[Tensor] = [torch.zeros(8, 4), torch.zeros(8, dtype=torch.int64)]
start, position, size = TF.enqueue(memory, [torch.ones(3, 4), torch.arange(3)], 0, 0)
assert_type(position, int)

# ----------------------------------------------------------------------------- DINO
out_dim = 64
backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 24))
student = MultiCropWrapper(backbone, DINOHead(24, out_dim=out_dim, hidden_dim=32, bottleneck_dim=8))
teacher = copy.deepcopy(student).requires_grad_(False)
criterion = DINOLoss(out_dim, n_crops=4, warmup_teacher_temp_epochs=1, n_epochs=2)
lr = cosine_schedule(5e-4, 1e-6, epochs=2, steps_per_epoch=2, warmup_epochs=1)
momentum = cosine_schedule(0.996, 1.0, 2, 2)
assert_type(lr, np.ndarray)
crops = [torch.rand(4, 3, 8, 8) for _ in range(4)]
student_out = student.forward(crops)
assert_type(student_out, Tensor)
with torch.no_grad():
    teacher_out = teacher(crops[:2])
dino = criterion.forward(student_out, teacher_out, epoch=0)
assert_type(dino, Tensor)
assert_type(criterion.center, Tensor)
assert_type(criterion.teacher_temp_at(1), float)
dino.backward()
ema_update_(teacher, student, float(momentum[0]))
head = DINOHead(24, out_dim=out_dim, hidden_dim=32, bottleneck_dim=8)
assert_type(head.forward(torch.randn(2, 24)), Tensor)
# The weight-normalised last layer is an nn.Linear (torch's weight_norm returns Any).
assert_type(head.last_layer.weight, Tensor)
assert head.last_layer.weight.shape == (out_dim, 8)
last_layer: nn.Linear = head.last_layer
assert isinstance(last_layer, nn.Linear)
# As the DINOHead docstring says, after a model-wide requires_grad_(True):
assert_type(head.last_layer.parametrizations.weight.original0, nn.Parameter)
head.last_layer.parametrizations.weight.original0.requires_grad_(False)
for parameter in head.last_layer.parameters():
    parameter.grad = None  # docs/how-to/dino.md: the prototype layer frozen for the first epoch


class ProjectionHead(DINOHead):
    """A user's subclass: the class method builds and returns one."""


restored = ProjectionHead.from_dino_checkpoint({"teacher": {f"head.{key}": value for key, value in
                                                            head.state_dict().items()}})
assert_type(restored, ProjectionHead)
assert type(restored) is ProjectionHead
assert_type(TF.dino_loss(student_out.detach(), teacher_out, criterion.center, n_crops=4, n_global_crops=2,
                         student_temp=0.1, teacher_temp=0.04), Tensor)

# ----------------------------------------------------------------------------- few-shot
proto = PrototypicalHead(metric="sqeuclidean")
# Before fit, reading the prototypes or classes raises (a ValueError that hasattr reads as absent).
assert not hasattr(proto, "classes") and proto.n_way == 0
fitted = proto.fit(x.detach()[:16], labels[:16])
assert_type(fitted, PrototypicalHead)
assert_type(proto.classes, Tensor)
assert_type(proto.prototypes, Tensor)
predictions = proto.predict(x.detach()[16:])
assert_type(predictions, Tensor)
assert_type(proto.n_way, int)
targets = torch.searchsorted(proto.classes, labels[16:])  # as docs/how-to/few-shot.md does
assert proto.classes.tolist() == list(range(4))


class EpisodeHead(PrototypicalHead):
    """A user's subclass: fit returns it, not the base class."""

    def confident(self, query: Tensor) -> Tensor:
        return self.forward(query).softmax(dim=1).amax(dim=1) > 0.5


fitted_subclass = EpisodeHead().fit(x.detach()[:16], labels[:16])
assert_type(fitted_subclass, EpisodeHead)
assert_type(fitted_subclass.confident(x.detach()[16:]), Tensor)

episodes = EpisodicSampler(labels, n_way=4, n_shot=2, n_query=2, n_episodes=3, seed=0)
assert_type(len(episodes), int)
results: list[tuple[Tensor, Tensor]] = []
for index in episodes:
    assert_type(index, list[int])
    support, support_labels, query, query_labels = split_episode(
        x.detach()[index], labels[index], n_way=4, n_shot=2, n_query=2)
    logits = proto.forward(support, support_labels, query)
    assert_type(logits, Tensor)
    results.append((logits, torch.searchsorted(proto.classes, query_labels)))
    F.cross_entropy(logits, torch.searchsorted(proto.classes, query_labels))
    assert_type(TF.prototypical_logits(support, support_labels, query), Tensor)
    prototypes, prototype_classes = TF.class_prototypes(support, support_labels)
    assert_type(prototype_classes, Tensor)
mean, ci95 = few_shot_accuracy(results)
assert_type(mean, float)
assert_type(few_shot_accuracy([2, 3, 4, 3], n_per_episode=4), tuple[float, float])

# ----------------------------------------------------------------------------- synthetic products
dataset = SyntheticProducts("train", num_products=8, views_per_domain=1, image_size=16, seed=0)
sample = dataset[0]
assert_type(sample, ProductSample[int, str])
assert_type(sample.image, Tensor)
assert_type(sample.product_id, int)
assert_type(sample.description, str)
assert isinstance(sample.product_id, int) and isinstance(sample.domain, int) and isinstance(sample.description, str)
batch = dataset.render_batch(range(4))
assert_type(batch.product_id, Tensor)
assert_type(batch.description, list[str])
assert isinstance(batch.product_id, Tensor) and isinstance(batch.view, Tensor) and isinstance(batch.description, list)
assert_type(encoder.encode(batch.description), Tensor)
assert_type(dataset.labels, Tensor)
assert_type(dataset.num_classes, int)

embedder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8))
novel = SyntheticProducts("novel", num_products=24, views_per_domain=2, image_size=16, seed=0)
novel_batch = novel.render_batch()
shots = evaluate(embedder, (novel_batch.image, novel_batch.product_id), n_way=2, n_shot=(1, 2), n_query=1,
                 n_episodes=3, seed=0)
assert_type(shots, dict[int, tuple[float, float]])
for shot, (shot_mean, shot_ci95) in shots.items():
    print(f"2-way {shot}-shot: {100 * shot_mean:.1f} +- {100 * shot_ci95:.1f} %")
evaluate(embedder, novel, n_way=2, n_shot=1, n_query=1, n_episodes=3, seed=0)
all_embeddings, all_labels = embed_dataset(embedder, novel, batch_size=16)
assert_type(all_embeddings, Tensor)

pk = PKSampler(dataset.labels, p=2, k=2, seed=0)
assert_type(pk.batch_size, int)
assert_type(pk.num_batches, int)
assert type(pk.num_batches) is int
loader = DataLoader(dataset, batch_sampler=pk)
for loaded in loader:
    images = loaded.image  # a collated ProductSample (DataLoader yields Any)
    break

# ----------------------------------------------------------------------------- metrics
gallery = torch.randn(40, 16)
gallery_labels = torch.arange(8).repeat_interleave(5)
report = retrieval_metrics(x.detach(), labels, gallery, gallery_labels, ks=(1, 5))
assert_type(report, RetrievalMetrics)
assert_type(report.recall, dict[int, float])
assert_type(report["map_at_r"], float)
for metric_name, value in report.items():  # a Mapping[str, float] of flat PML-style keys
    assert_type(metric_name, str)
    assert_type(value, float)
assert_type(recall_at_k(x.detach(), labels, ks=(1, 2)), dict[int, float])
assert_type(map_at_r(x.detach(), labels), float)
auc = multilabel_auc(torch.rand(10, 3), torch.tensor([[1, 0, 1], [0, 1, 0]] * 5))
assert_type(auc, Tensor)
assert_type(relative_improvement(auc, 0.5), Tensor)

# ----------------------------------------------------------------------------- semantic layers
features = torch.randn(2, 32, 8, 8)
semantic = torch.rand(2, 3, 16, 16)
attention = SemanticChannelAttention(32, 3, reduction=4)
assert_type(attention.forward(features, semantic), Tensor)
assert_type(attention.forward(features, semantic, return_attention=False), Tensor)
rescaled, weights = attention.forward(features, semantic, return_attention=True)
assert_type(rescaled, Tensor)
assert_type(weights, Tensor)


def attend(return_attention: bool) -> Tensor | tuple[Tensor, Tensor]:
    """A flag known only at run time: either form."""
    return attention.forward(features, semantic, return_attention=return_attention)


assert isinstance(attend(False), Tensor) and isinstance(attend(True), tuple)
assert_type(SemanticFusion(32, 3, mode="feature_concat").forward(features, semantic), Tensor)
attributes_head = MultiLabelHead(32, 5, pooling="semantic", foreground_channels=[1, 2])
assert_type(attributes_head.forward(features, semantic), Tensor)
assert_type(attributes_head.in_channels, int)
assert_type(attributes_head.foreground_channels, list[int] | None)
assert attributes_head.foreground_channels == [1, 2]
cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
wrapped = wrap_backbone(cnn, "1", SemanticChannelAttention(32, 3, reduction=4))
pooled: Any = wrapped(torch.rand(2, 3, 8, 8), semantic)

# ----------------------------------------------------------------------------- distributed helpers
assert_type(world_size(), int)
assert_type(all_gather_with_grad(x), Tensor)
assert_type(all_gather_no_grad(labels), Tensor)
gathered = gather_batch([x, labels, None], ["embeddings", "labels", "text_embeddings"])
gathered_embeddings, gathered_labels, gathered_text = gathered.tensors
assert_type(gathered_text, Tensor | None)  # None where None was given
assert_type(gathered.offset, int)
gathered_tensors, gathered_offset, gathered_sizes = gathered  # it is the tuple (tensors, offset, sizes)
assert_type(gathered_tensors, list[Tensor | None])
assert_type(gathered_offset, int)
assert_type(gathered_sizes, list[int])
assert gathered_offset == 0 and gathered_sizes == [32] and gathered_tensors[0] is x
