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
VECTOR = "vector"                  # [N, 3, d] float: PaiNN vector features
EDGE = "edge"                      # [E, d] float: edge features (GemNet-OC x_F)
EDGE_INDEX = "edge_index"          # [2, E] long: row 0 source s (neighbour), row 1 target t
EDGE_VECTOR = "edge_vector"        # [E, 3] float: unit vector (pos[t] - pos[s] + offset @ cell) / |.|
CELL_OFFSET = "cell_offset"        # [E, 3] long: integer cell offset of each edge
E2N = "e2n"                        # [N, d] float: sum over edges with target t of EDGE
E2V = "e2v"                        # [N, 3, d] float: sum over edges with target t of EDGE_VECTOR ⊗ EDGE

#: Hidden features a caller may request from a model's forward (``features=``).
FEATURE_KEYS = (NODE, VECTOR, EDGE, E2N, E2V)
