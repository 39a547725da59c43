"""Building blocks of GemNet-OC: dense layers, residual layers, embeddings and the
"efficient" bilinear layers that contract a basis with padded neighbour matrices.

Parameter names (``linear.weight``, ``dense_mlp``, ``scale_factor``, ``embeddings``,
``bilinear``, ``weight``) match the Open Catalyst checkpoints.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from kdcache.models.scaling import ScaledSiLU  # shared with the students


# --------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------
def he_orthogonal_init(weight: torch.Tensor) -> torch.Tensor:
    """Random (semi-)orthogonal matrix, standardised per output unit to variance 1/fan_in.

    Decorrelated initial features train better; a 3-d weight (radial, spherical, out) treats the
    first two axes as the input.
    """
    nn.init.orthogonal_(weight)
    fan_in = weight.shape[:-1].numel() if weight.dim() == 3 else weight.shape[1]
    axes = [0, 1] if weight.dim() == 3 else 1
    with torch.no_grad():
        var, mean = torch.var_mean(weight, dim=axes, unbiased=True, keepdim=True)
        weight.copy_((weight - mean) / (var + 1e-6) ** 0.5 * (1 / fan_in) ** 0.5)
    return weight


def get_initializer(name: str):
    """Initialiser of the final energy/force layers by name (``HeOrthogonal`` or ``zeros``)."""
    key = name.lower()
    if key == "heorthogonal":
        return he_orthogonal_init
    if key == "zeros":
        return nn.init.zeros_
    raise ValueError(f"unknown output initialiser {name!r}")


# --------------------------------------------------------------------------------------------
# dense and residual layers
# --------------------------------------------------------------------------------------------
def make_activation(activation: str | None) -> nn.Module:
    if activation is None:
        return nn.Identity()
    if activation.lower() in ("silu", "swish"):
        return ScaledSiLU()
    raise ValueError(f"activation {activation!r} is not supported by GemNet-OC (use 'silu')")


class Dense(nn.Module):
    """Linear layer (He-orthogonal init, no bias by default) followed by an optional scaled SiLU.

    Args:
        in_features: input width.
        out_features: output width.
        bias: add a bias (initialised to zero).
        activation: ``"silu"`` or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activation: str | None = None):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.reset_parameters()
        self._activation = make_activation(activation)

    def reset_parameters(self, initializer=he_orthogonal_init) -> None:
        initializer(self.linear.weight)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._activation(self.linear(x))


class ResidualLayer(nn.Module):
    """x -> (x + MLP(x)) / sqrt(2) with ``n_layers`` dense layers of equal width.

    Args:
        units: width.
        n_layers: dense layers inside the block.
        activation: activation of every dense layer.
    """

    def __init__(self, units: int, n_layers: int = 2, activation: str | None = None):
        super().__init__()
        self.dense_mlp = nn.Sequential(*[Dense(units, units, activation=activation) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.dense_mlp(x)) * (1 / math.sqrt(2))


# --------------------------------------------------------------------------------------------
# embeddings
# --------------------------------------------------------------------------------------------
class AtomEmbedding(nn.Module):
    """Learned vector per element (row Z-1, so hydrogen is row 0).

    Args:
        emb_size: width.
        num_elements: number of elements covered (Z = 1..num_elements).
    """

    def __init__(self, emb_size: int, num_elements: int):
        super().__init__()
        self.emb_size = emb_size
        self.embeddings = nn.Embedding(num_elements, emb_size)
        nn.init.uniform_(self.embeddings.weight, -math.sqrt(3), math.sqrt(3))

    def forward(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        return self.embeddings(atomic_numbers - 1)


class EdgeEmbedding(nn.Module):
    """Edge s->t: Dense([h_s, h_t, m_st]).

    Args:
        atom_features: atom embedding width.
        edge_features: width of the per-edge input (radial basis or edge embedding).
        out_features: output width.
        activation: activation of the dense layer.
    """

    def __init__(self, atom_features: int, edge_features: int, out_features: int, activation: str | None = None):
        super().__init__()
        self.dense = Dense(2 * atom_features + edge_features, out_features, activation=activation)

    def forward(self, h: torch.Tensor, m: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.dense(torch.cat([h[edge_index[0]], h[edge_index[1]], m], dim=-1))


# --------------------------------------------------------------------------------------------
# efficient basis contraction
# --------------------------------------------------------------------------------------------
def _padded(values: torch.Tensor, outer: torch.Tensor, inner: torch.Tensor, rows: int, k: int | None = None) -> torch.Tensor:
    """Scatter ``values`` into a zero tensor [rows, K, ...] at (outer, inner).

    ``k``: K, which must be ``max(inner) + 1`` (:func:`~kdcache.models.gemnet_oc.indices.inner_size`);
    computed here when not given, at the price of a host sync (the model's graph carries it).
    """
    if k is None:
        k = int(inner.max()) + 1 if inner.numel() else 0
    out = values.new_zeros((rows, k, *values.shape[1:]))
    out[outer, inner] = values
    return out


class RaggedBasis(NamedTuple):
    """A bilinear basis without padding, for :class:`EfficientInteractionBilinear`: the compiled
    path's layout where the padded one is mostly zeros (quadruplets: the padded width is the most
    quadruplets of any edge, several times their mean). Same sums, in another order.

    Attributes:
        rad: ``[E, interm, S]`` the projected radial part (as in the padded layout).
        sph: ``[T, S]`` the angular part of each triplet/quadruplet, unpadded.
    """

    rad: torch.Tensor
    sph: torch.Tensor


class BucketedBasis(NamedTuple):
    """A bilinear basis padded per bucket of edges, for :class:`EfficientInteractionBilinear`:
    the compiled path's layout where one padded matrix would be mostly zeros (quadruplets on
    more than one generated-kernel thread, where the ragged sum's scatter-add is atomic). Same
    sums, over matrices padded to each bucket's largest count
    (:func:`~kdcache.models.gemnet_oc.indices.edge_buckets`).

    Attributes:
        rad: ``[E, interm, S]`` the projected radial part (as in the padded layout).
        sph: per bucket ``[E_b, S, K_b]``, the angular part padded to the bucket's width.
        buckets: the :func:`~kdcache.models.gemnet_oc.indices.edge_buckets` dict.
    """

    rad: torch.Tensor
    sph: tuple
    buckets: dict


class BasisEmbedding(nn.Module):
    """Project a raw basis onto an intermediate width, shared across interaction blocks.

    With ``num_spherical`` the weight is ``[num_radial, num_spherical, emb]`` and the radial part
    becomes ``[E, emb, num_spherical]`` (the reshape order of the reference, which trained
    checkpoints depend on); without it, ``[emb, num_radial]`` (a plain radial projection).

    Args:
        num_radial: radial functions.
        emb_size_interm: intermediate width.
        num_spherical: angular functions (None for a radial-only projection).
    """

    def __init__(self, num_radial: int, emb_size_interm: int, num_spherical: int | None = None):
        super().__init__()
        self.num_radial = num_radial
        self.num_spherical = num_spherical
        shape = (emb_size_interm, num_radial) if num_spherical is None else (num_radial, num_spherical, emb_size_interm)
        self.weight = nn.Parameter(torch.empty(shape))
        he_orthogonal_init(self.weight)

    def forward(
        self,
        rad_basis: torch.Tensor,
        sph_basis: torch.Tensor | None = None,
        idx_rad_outer: torch.Tensor | None = None,
        idx_rad_inner: torch.Tensor | None = None,
        idx_sph_outer: torch.Tensor | None = None,
        idx_sph_inner: torch.Tensor | None = None,
        num_atoms: int | None = None,
        rad_inner_size: int | None = None,
        sph_inner_size: int | None = None,
        ragged: bool = False,
        buckets: dict | None = None,
    ):
        """Returns the projected radial part, optionally combined with the angular part.

        ``rad_inner_size`` / ``sph_inner_size``: ``max + 1`` of ``idx_rad_inner`` / ``idx_sph_inner``
        (the padded widths; computed, with a host sync, when not given). ``ragged`` (with
        ``idx_sph_inner``, without ``idx_rad_inner``): a :class:`RaggedBasis` instead of the padded
        pair, the angular part left per triplet. ``buckets`` (likewise; an
        :func:`~kdcache.models.gemnet_oc.indices.edge_buckets` dict of ``idx_sph_outer``): a
        :class:`BucketedBasis`, the angular part padded per bucket.

        - radial only: ``[E, emb]``, or per atom ``[A, emb, K]`` with ``idx_rad_*``;
        - ``sph_basis`` and ``idx_sph_outer`` only: the per-triplet product ``[T, emb]``;
        - with ``idx_sph_inner``: ``(rad [E or A, emb, (K·)num_spherical], sph [E, num_spherical, K])``
          for :class:`EfficientInteractionBilinear`.
        """
        if (ragged or buckets is not None) and (idx_rad_inner is not None or idx_sph_inner is None):
            raise ValueError("a ragged or bucketed basis needs idx_sph_inner and has no per-atom radial "
                             "part (idx_rad_inner)")
        n_edges = rad_basis.shape[0]
        if self.num_spherical is not None:
            # explicit width, not -1: an empty edge set (a molecule has no quadruplet edges) has
            # zero rows, and reshape cannot infer a dimension of a tensor with no elements
            width = self.weight[0].numel() // sph_basis.shape[-1]
            rad = (rad_basis @ self.weight.reshape(self.weight.shape[0], -1)).reshape(n_edges, width, sph_basis.shape[-1])
        else:
            rad = rad_basis @ self.weight.T

        if idx_rad_inner is not None:
            # neighbours of each atom side by side: [A, emb, K(·num_spherical)]
            per_atom = _padded(rad, idx_rad_outer, idx_rad_inner, num_atoms, rad_inner_size)
            rad = per_atom.transpose(1, 2).reshape(num_atoms, rad.shape[1], -1)

        if sph_basis is None:
            return rad
        if idx_sph_inner is None:
            return (rad[idx_sph_outer] @ sph_basis[:, :, None]).squeeze(-1)
        if ragged:
            return RaggedBasis(rad, sph_basis)
        if buckets is not None:
            sph = tuple(
                _padded(sph_basis[elements], rows, inner, edges.shape[0], width).transpose(1, 2)
                for edges, elements, rows, inner, width in zip(
                    buckets["edges"], buckets["elements"], buckets["rows"], buckets["inner"], buckets["widths"]))
            return BucketedBasis(rad, sph, buckets)
        sph = _padded(sph_basis, idx_sph_outer, idx_sph_inner, n_edges, sph_inner_size).transpose(1, 2)
        return rad, sph


class EfficientInteractionBilinear(nn.Module):
    """Sum over triplets/quadruplets of basis ⊗ message, then a bilinear map, as dense matmuls.

    Args:
        emb_size_in: width of the incoming messages.
        emb_size_interm: width of the projected basis.
        emb_size_out: output width.
    """

    def __init__(self, emb_size_in: int, emb_size_interm: int, emb_size_out: int):
        super().__init__()
        self.emb_size_in = emb_size_in
        self.emb_size_interm = emb_size_interm
        self.emb_size_out = emb_size_out
        self.bilinear = Dense(emb_size_in * emb_size_interm, emb_size_out)

    def forward(
        self,
        basis: tuple[torch.Tensor, torch.Tensor],
        m: torch.Tensor,
        idx_agg_outer: torch.Tensor,
        idx_agg_inner: torch.Tensor,
        idx_agg2_outer: torch.Tensor | None = None,
        idx_agg2_inner: torch.Tensor | None = None,
        agg2_out_size: int | None = None,
    ) -> torch.Tensor:
        if isinstance(basis, RaggedBasis):
            if idx_agg2_outer is not None:
                raise ValueError("a ragged basis has no second aggregation (idx_agg2_outer)")
            rad = basis.rad
            # Σ over each edge's triplets of sph ⊗ m, without the padded [E, K, in] matrix (the
            # outer product is fused into the scatter when compiled); the basis and the messages
            # share their outer index
            sph_m = m.new_zeros(rad.shape[0], basis.sph.shape[1], m.shape[1]).index_add_(
                0, idx_agg_outer, basis.sph[:, :, None] * m[:, None, :])  # [E, S, in]
            out = rad @ sph_m  # [E, interm, in]
            return self.bilinear(out.reshape(-1, out.shape[1] * out.shape[2]))
        if isinstance(basis, BucketedBasis):
            if idx_agg2_outer is not None:
                raise ValueError("a bucketed basis has no second aggregation (idx_agg2_outer)")
            buckets = basis.buckets
            # row 0: an edge that sums nothing (the bilinear map of zeros)
            parts = [self.bilinear(m.new_zeros(1, self.emb_size_in * self.emb_size_interm))]
            for sph, edges, elements, rows, inner in zip(
                    basis.sph, buckets["edges"], buckets["elements"], buckets["rows"], buckets["inner"]):
                m_padded = _padded(m[elements], rows, inner, sph.shape[0], sph.shape[2])  # [E_b, K_b, in]
                out = basis.rad[edges] @ (sph @ m_padded)  # [E_b, interm, in]
                parts.append(self.bilinear(out.reshape(-1, out.shape[1] * out.shape[2])))
            return torch.cat(parts)[buckets["gather"]]
        rad, sph = basis  # [E, interm, S] (or per atom [A, interm, K2·S]), [E, S, K]
        # the padded widths K and K2 are those of the basis (same indices), known without a sync
        m_padded = _padded(m, idx_agg_outer, idx_agg_inner, sph.shape[0], sph.shape[2])  # [E, K, in]
        sph_m = sph @ m_padded  # [E, S, in]
        if idx_agg2_outer is not None:
            # second aggregation (edges -> atoms), again through a padded matrix
            k2 = rad.shape[2] // sph.shape[1]
            per_atom = _padded(sph_m, idx_agg2_outer, idx_agg2_inner, agg2_out_size, k2)  # [A, K2, S, in]
            sph_m = per_atom.reshape(agg2_out_size, -1, sph_m.shape[-1])
        out = rad @ sph_m  # [E or A, interm, in]
        return self.bilinear(out.reshape(-1, out.shape[1] * out.shape[2]))
