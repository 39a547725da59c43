"""Names of every property that flows between datasets, models, stores and trainers.

One place per name: import the constant, never spell the string. Shapes use
``S`` = structures in a batch, ``N`` = atoms in a batch (flat), ``E`` = edges, ``d`` = channels.
"""

# --- structure fields (a dataset sample / a PyG batch) -------------------------------------
POSITIONS = "pos"                  # [N, 3] float, Å
ATOMIC_NUMBERS = "atomic_numbers"  # [N] long
CELL = "cell"                      # [S, 3, 3] float, Å (rows are lattice vectors; zeros if not periodic)
PBC = "pbc"                        # [S, 3] bool
NATOMS = "natoms"                  # [S] long
TAGS = "tags"                      # [N] long: 0 subsurface, 1 surface, 2 adsorbate (OC20); 0 otherwise
FIXED = "fixed"                    # [N] bool: atom held fixed (FixAtoms); no force loss on it
BATCH = "batch"                    # [N] long: structure of each atom (added by PyG batching)
SAMPLE_INDEX = "sample_index"      # [S] long: global dataset index, joins stage-one targets
SID = "sid"                        # [S] long: OC20 system id (when known)
FID = "fid"                        # [S] long: OC20 frame id (when known)

# --- labels (physical units) -----------------------------------------------------------------
ENERGY = "energy"                  # [S] float, eV
FORCES = "forces"                  # [N, 3] float, eV/Å

# --- model outputs (a model's forward returns these; raw = normalised units) ----------------
ATOM_ENERGY = "atom_energy"        # [N] float: per-atom energy before the sum over atoms
NODE = "node"                      # [N, d] float: node features (GemNet-OC x_E, PaiNN x, SchNet h)
VECTOR = "vector"                  # [N, 3, d] float: PaiNN vector features (equivariant)
EDGE = "edge"                      # [E, d] float: edge features (GemNet-OC x_F, direct forces only)
EDGE_INDEX = "edge_index"          # [2, E] long: row 0 source s (neighbour), row 1 target t
EDGE_VECTOR = "edge_vector"        # [E, 3] float: unit vector (pos[t] - pos[s] + offset @ cell) / |.|
CELL_OFFSET = "cell_offset"        # [E, 3] long: integer cell offset of each edge
E2N = "e2n"                        # [N, d] float: sum over edges with target t of EDGE
E2V = "e2v"                        # [N, 3, d] float: sum over edges with target t of EDGE_VECTOR ⊗ EDGE

# --- Hessian-vector products (kdcache/hessian.py) ---------------------------------------------
HVP = "hvp"                        # [N, 3, K] float: -dF/dpos · v_k for K probes (H·v_k for gradient forces), eV/Å²
HVP_PROBES = "hvp_probes"          # [N, 3, K] float: the probes v_k (regenerated from sample_index, never stored)

# --- v2v, e2v and vector: three names, one idea -----------------------------------------------
# The strategy "v2v" (vector to vector, kdcache/train/strategies.py) trains a student's VECTOR
# features, [N, 3, d] (PaiNN's vec; only PaiNN has them), through a bias-free linear map to
# d_teacher channels, against an equivariant per-atom target [N, 3, d_teacher] from the store:
#   * E2V ("e2v") from a teacher with edge features (GemNet-OC): Σ over edges into atom t of
#     EDGE_VECTOR ⊗ EDGE, computed in one place, kdcache/features.py (aggregate_edge_features);
#   * VECTOR ("vector") from a PaiNN teacher: its own vector features, stored as they are.
# So "e2v" names a stored target (how it was made), "vector" a model feature (what it is), and
# "v2v" the loss between a student's vector and either of them.

#: Hidden features a caller may request from a model's forward (``features=``).
FEATURE_KEYS = (NODE, VECTOR, EDGE, E2N, E2V)

#: Keys a model returns along with a requested feature: EDGE comes with its graph, one row per
#: edge in the same order (EDGE_VECTOR and CELL_OFFSET are [E, 3], EDGE_INDEX is [2, E]).
FEATURE_COMPANIONS = {EDGE: (EDGE_INDEX, EDGE_VECTOR, CELL_OFFSET)}

#: batch key of an optional :class:`kdcache.graph.NeighborList` (not a tensor): the model's radius
#: graphs come from it, and its graph is reused while they are unchanged (the ASE calculator sets it)
NEIGHBOR_LIST = "neighbor_list"
