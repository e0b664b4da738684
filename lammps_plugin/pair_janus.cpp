/* pair_style janus: runs an exported Janus TorchScript model (janus_potential.export).

   Per compute(): edges from LAMMPS's full neighbor list (centres = owned atoms, neighbours
   owned or ghost, cutoff = the model cutoff); node features go through the model's
   prepare -> embed -> [interaction_l -> forward halo exchange (all but the last layer)] ->
   readout sequence, and the gradient of the owned-atom energy runs back layer by layer with
   the reverse halo exchange (ghost rows summed into their owners, then zeroed). The ghost shell is one cutoff wide. Forces and the
   virial come from the gradient with respect to the edge vectors (DESIGN.md).

   Under pair_style hybrid / hybrid/overlay, atoms of types mapped to NULL are species 0: no
   edges touch them and the model gives them no energy. The halo width (comm_forward /
   comm_reverse = node feature width) is known only after pair_coeff has read the model, so
   init_style raises the hybrid's own values, which sized LAMMPS's buffers at settings time. */

#include "pair_janus.h"
#include "sha256.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "json.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"

#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>

using namespace LAMMPS_NS;

namespace {

constexpr int FORMAT_VERSION = 2;
constexpr double MIN_DISTANCE = 0.1;    // Angstrom: closer atoms are an error (janus_potential.graph)

const char *const ELEMENTS[] = {
    "X",  "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si",
    "P",  "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
    "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru",
    "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr",
    "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",
    "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac",
    "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf",
    "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};
constexpr int NUM_ELEMENTS = sizeof(ELEMENTS) / sizeof(ELEMENTS[0]);

int atomic_number(const std::string &symbol)
{
  for (int z = 1; z < NUM_ELEMENTS; ++z)
    if (symbol == ELEMENTS[z]) return z;
  return 0;
}

// copy rows of a [n, width] float/double tensor into/out of LAMMPS's double buffers
template <typename T> int pack_rows(const T *data, int width, int n, const int *list, int first, double *buf)
{
  int m = 0;
  for (int i = 0; i < n; ++i) {
    const T *row = data + (int64_t) (list ? list[i] : first + i) * width;
    for (int k = 0; k < width; ++k) buf[m++] = static_cast<double>(row[k]);
  }
  return m;
}

template <typename T> void unpack_rows(T *data, int width, int n, const int *list, int first, const double *buf, bool add)
{
  int m = 0;
  for (int i = 0; i < n; ++i) {
    T *row = data + (int64_t) (list ? list[i] : first + i) * width;
    if (add)
      for (int k = 0; k < width; ++k) row[k] += static_cast<T>(buf[m++]);
    else
      for (int k = 0; k < width; ++k) row[k] = static_cast<T>(buf[m++]);
  }
}

// janus_potential.integrity.module_digest: for every parameter and buffer, sorted by name,
// the name, a NUL byte and the tensor's raw bytes
std::string module_digest(const torch::jit::Module &module)
{
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto &item : module.named_parameters(true)) tensors.emplace_back(item.name, item.value);
  for (const auto &item : module.named_buffers(true)) tensors.emplace_back(item.name, item.value);
  std::sort(tensors.begin(), tensors.end(), [](const auto &a, const auto &b) { return a.first < b.first; });
  janus::Sha256 digest;
  const char nul = 0;
  for (const auto &[name, value] : tensors) {
    digest.update(name.data(), name.size());
    digest.update(&nul, 1);
    auto data = value.detach().to(torch::kCPU).contiguous();
    digest.update(data.data_ptr(), data.nbytes());
  }
  return digest.hexdigest();
}

}    // namespace

PairJanus::PairJanus(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;
  centroidstressflag = CENTROID_NOTAVAIL;
  comm_forward = 0;
  comm_reverse = 0;
}

PairJanus::~PairJanus()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairJanus::allocate()
{
  allocated = 1;
  int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) setflag[i][j] = 0;
}

void PairJanus::settings(int narg, char **arg)
{
  if (narg != 0) error->all(FLERR, "Pair style janus takes no arguments (the model file goes in pair_coeff), got '{}'", arg[0]);
}

void PairJanus::load_model(const std::string &path)
{
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe.good()) error->all(FLERR, "Pair janus: cannot open model file {}: file does not exist or is not readable", path);
  }
  torch::jit::ExtraFilesMap extra{{"metadata.json", ""}};
  try {
    module_ = torch::jit::load(path, torch::kCPU, extra);
  } catch (std::exception &e) {
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));
    error->all(FLERR, "Pair janus: cannot load model file {} (not a TorchScript file or corrupt): {}", path, what);
  }
  if (extra["metadata.json"].empty())
    error->all(FLERR, "Pair janus: {} is not a Janus model file (no metadata.json)", path);

  json meta;
  try {
    meta = json::parse(extra["metadata.json"]);
    if (meta.value("format", std::string()) != "janus-torchscript")
      error->all(FLERR, "Pair janus: {} is not a Janus model file (format is not janus-torchscript)", path);
    int version = meta.at("format_version").get<int>();
    if (version != FORMAT_VERSION)
      error->all(FLERR, "Pair janus: {} has format version {}, this plugin reads format version {}; re-export the model", path,
                 version, FORMAT_VERSION);
    cutoff_ = meta.at("cutoff").get<double>();
    num_interactions_ = meta.at("num_interactions").get<int>();
    features_ = meta.at("features").get<int>();
    std::string dtype = meta.at("dtype").get<std::string>();
    if (dtype == "float32")
      dtype_ = torch::kFloat32;
    else if (dtype == "float64")
      dtype_ = torch::kFloat64;
    else
      error->all(FLERR, "Pair janus: {} has unsupported dtype {}", path, dtype);
    covered_.clear();
    for (const auto &symbol : meta.at("elements")) covered_.push_back(atomic_number(symbol.get<std::string>()));
    if (module_digest(module_) != meta.at("weights_sha256").get<std::string>())
      error->all(FLERR,
                 "Pair janus: model file {} is corrupt: its weights do not match the SHA-256 content hash in its "
                 "metadata",
                 path);
  } catch (json::exception &e) {
    error->all(FLERR, "Pair janus: {} has invalid metadata.json: {}", path, e.what());
  }
  if (cutoff_ <= 0.0 || num_interactions_ < 1 || features_ < 1)
    error->all(FLERR, "Pair janus: {} has invalid metadata (cutoff {}, {} interactions, {} features)", path, cutoff_,
               num_interactions_, features_);

  module_.eval();
  // Run the scripted graphs as written: the profiling executor's optimised graphs used more
  // memory and were not faster (the ASE calculator does the same, docs/model.md).
  torch::jit::setGraphExecutorOptimize(false);
  for (auto parameter : module_.parameters()) parameter.requires_grad_(false);
  model_loaded_ = true;
  model_path_ = path;
  comm_forward = features_;
  comm_reverse = features_;
}

void PairJanus::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  int ntypes = atom->ntypes;
  if (narg < 3 || strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "Pair janus: expected 'pair_coeff * * model.pt El1 El2 ...'");
  if (narg != 3 + ntypes)
    error->all(FLERR,
               "Pair janus: pair_coeff maps {} of {} atom types; give one element symbol (or NULL) per atom type: "
               "pair_coeff * * model.pt El1 ... El{}",
               narg - 3, ntypes, ntypes);

  load_model(arg[2]);

  type_z_.assign(ntypes + 1, 0);
  for (int t = 1; t <= ntypes; ++t) {
    std::string symbol = arg[2 + t];
    if (symbol == "NULL") continue;
    int z = atomic_number(symbol);
    if (z == 0) error->all(FLERR, "Pair janus: '{}' (atom type {}) is not an element symbol", symbol, t);
    if (std::find(covered_.begin(), covered_.end(), z) == covered_.end())
      error->all(FLERR, "Pair janus: element {} (atom type {}) is not covered by model {}", symbol, t, model_path_);
    type_z_[t] = z;
  }
  // NULL types count as set when janus is the only pair style, so that init_style() can name
  // them; under pair_style hybrid they stay unset for the hybrid's own bookkeeping
  const bool standalone = force->pair == this;
  for (int i = 1; i <= ntypes; ++i)
    for (int j = i; j <= ntypes; ++j) setflag[i][j] = (standalone || (type_z_[i] > 0 && type_z_[j] > 0)) ? 1 : 0;
}

void PairJanus::init_style()
{
  if (!model_loaded_) error->all(FLERR, "Pair janus: no model loaded; use pair_coeff * * model.pt El1 El2 ...");
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "Pair janus requires 'units metal' (eV, Angstrom), not units {}", update->unit_style);
  if (force->newton_pair == 0) error->all(FLERR, "Pair janus requires 'newton on' (newton_pair on)");
  bool hybrid = force->pair != this;
  for (int t = 1; t <= atom->ntypes; ++t)
    if (type_z_[t] == 0 && !hybrid)
      error->all(FLERR,
                 "Pair janus: atom type {} is not mapped to an element (NULL in pair_coeff); map every type or use "
                 "pair_style hybrid",
                 t);
  if (hybrid) {
    force->pair->comm_forward = std::max(force->pair->comm_forward, comm_forward);
    force->pair->comm_reverse = std::max(force->pair->comm_reverse, comm_reverse);
  }
  neighbor->add_request(this, NeighConst::REQ_FULL);
}

double PairJanus::init_one(int i, int j)
{
  if (setflag[i][j] == 0) {
    error->all(FLERR, "Pair janus: atom types {} and {} are not mapped to elements by pair_coeff", i, j);
  }
  return cutoff_;
}

void PairJanus::exchange_forward(torch::Tensor &rows)
{
  comm_rows_ = rows;
  comm->forward_comm(this);
  comm_rows_ = torch::Tensor();
}

void PairJanus::exchange_reverse(torch::Tensor &rows)
{
  comm_rows_ = rows;
  comm->reverse_comm(this);
  comm_rows_ = torch::Tensor();
}

int PairJanus::pack_forward_comm(int n, int *list, double *buf, int, int *)
{
  if (dtype_ == torch::kFloat64) return pack_rows(comm_rows_.data_ptr<double>(), features_, n, list, 0, buf);
  return pack_rows(comm_rows_.data_ptr<float>(), features_, n, list, 0, buf);
}

void PairJanus::unpack_forward_comm(int n, int first, double *buf)
{
  if (dtype_ == torch::kFloat64)
    unpack_rows(comm_rows_.data_ptr<double>(), features_, n, nullptr, first, buf, false);
  else
    unpack_rows(comm_rows_.data_ptr<float>(), features_, n, nullptr, first, buf, false);
}

int PairJanus::pack_reverse_comm(int n, int first, double *buf)
{
  if (dtype_ == torch::kFloat64) return pack_rows(comm_rows_.data_ptr<double>(), features_, n, nullptr, first, buf);
  return pack_rows(comm_rows_.data_ptr<float>(), features_, n, nullptr, first, buf);
}

void PairJanus::unpack_reverse_comm(int n, int *list, double *buf)
{
  if (dtype_ == torch::kFloat64)
    unpack_rows(comm_rows_.data_ptr<double>(), features_, n, list, 0, buf, true);
  else
    unpack_rows(comm_rows_.data_ptr<float>(), features_, n, list, 0, buf, true);
}

void PairJanus::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);

  double **x = atom->x;
  double **f = atom->f;
  int *type = atom->type;
  tagint *tag = atom->tag;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const int inum = list->inum;
  int *ilist = list->ilist;
  int *numneigh = list->numneigh;
  int **firstneigh = list->firstneigh;
  const double cutoff_sq = cutoff_ * cutoff_;

  auto species = torch::empty({nall}, torch::kLong);
  int64_t *species_data = species.data_ptr<int64_t>();
  for (int i = 0; i < nall; ++i) species_data[i] = type_z_[type[i]];

  // edges centre -> neighbour within the model cutoff, r = x_neighbour - x_centre
  std::vector<int64_t> centres, neighbours;
  std::vector<double> vectors;
  int64_t reserve = 0;
  for (int ii = 0; ii < inum; ++ii) reserve += numneigh[ilist[ii]];
  centres.reserve(reserve);
  neighbours.reserve(reserve);
  vectors.reserve(3 * reserve);
  for (int ii = 0; ii < inum; ++ii) {
    const int i = ilist[ii];
    if (type_z_[type[i]] == 0) continue;
    const int *jlist = firstneigh[i];
    for (int jj = 0; jj < numneigh[i]; ++jj) {
      const int j = jlist[jj] & NEIGHMASK;
      if (type_z_[type[j]] == 0) continue;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      const double rsq = dx * dx + dy * dy + dz * dz;
      if (rsq >= cutoff_sq) continue;
      if (rsq < MIN_DISTANCE * MIN_DISTANCE)
        error->one(FLERR, "Pair janus: atoms {} and {} overlap (distance {:.4g} A < {} A)", tag[i], tag[j], std::sqrt(rsq),
                   MIN_DISTANCE);
      centres.push_back(i);
      neighbours.push_back(j);
      vectors.push_back(dx);
      vectors.push_back(dy);
      vectors.push_back(dz);
    }
  }
  const int64_t num_edges = (int64_t) centres.size();
  auto edge_index = torch::empty({2, num_edges}, torch::kLong);
  std::copy(centres.begin(), centres.end(), edge_index.data_ptr<int64_t>());
  std::copy(neighbours.begin(), neighbours.end(), edge_index.data_ptr<int64_t>() + num_edges);
  auto edge_vectors = torch::from_blob(vectors.data(), {num_edges, 3}, torch::kFloat64).to(dtype_, false, true);
  edge_vectors.requires_grad_(true);

  torch::Tensor atom_energy, edge_gradient;
  try {
    // geometry once; its differentiable tensors become leaves so that every layer's backward
    // stops there, and one final backward through prepare() gives dE/d(edge vectors)
    auto geometry_out = module_.get_method("prepare")({species, edge_index, edge_vectors}).toTuple();
    std::vector<c10::IValue> geometry_items;
    std::vector<torch::Tensor> geometry_outputs, geometry_leaves;
    for (const auto &item : geometry_out->elements()) {
      auto tensor = item.toTensor();
      if (tensor.requires_grad()) {
        auto leaf = tensor.detach().requires_grad_(true);
        geometry_outputs.push_back(tensor);
        geometry_leaves.push_back(leaf);
        geometry_items.emplace_back(leaf);
      } else {
        geometry_items.emplace_back(tensor);
      }
    }
    auto geometry = c10::ivalue::Tuple::createNamed(std::move(geometry_items), geometry_out->type<c10::TupleType>());
    std::vector<torch::Tensor> geometry_grads(geometry_leaves.size());

    auto interaction = module_.get_method("interaction");
    std::vector<torch::Tensor> layer_inputs, layer_outputs;
    auto h = module_.get_method("embed")({species}).toTensor().detach();
    for (int l = 0; l < num_interactions_; ++l) {
      auto h_in = l == 0 ? h : h.requires_grad_(true);
      // owned rows first: the model leaves ghost rows to the forward exchange below
      // (node features, router probability sum, expert load): LAMMPS needs the features only
      auto h_out = interaction({(int64_t) l, h_in, species, geometry, (int64_t) nlocal}).toTupleRef().elements()[0].toTensor();
      layer_inputs.push_back(h_in);
      layer_outputs.push_back(h_out);
      h = h_out.detach().clone().contiguous();
      // halo exchange after every layer but the last: the readout needs owned rows only
      // (janus_potential.model.run_layers follows the same rule)
      if (l + 1 < num_interactions_) exchange_forward(h);
    }
    h.requires_grad_(true);
    atom_energy =
        module_.get_method("readout")({h.narrow(0, 0, nlocal), species.narrow(0, 0, nlocal), geometry}).toTensor();
    // the readout depends on the node features and, through the ZBL prior, on the geometry
    std::vector<torch::Tensor> readout_inputs(geometry_leaves);
    readout_inputs.push_back(h);
    auto readout_grads = torch::autograd::grad({atom_energy.sum()}, readout_inputs, {}, false, false, true);
    for (size_t k = 0; k < geometry_leaves.size(); ++k)
      if (readout_grads[k].defined()) geometry_grads[k] = readout_grads[k];
    auto node_gradient = readout_grads.back().defined() ? readout_grads.back() : torch::zeros_like(h);

    for (int l = num_interactions_ - 1; l >= 0; --l) {
      node_gradient = node_gradient.contiguous();
      if (l + 1 < num_interactions_) {    // the adjoint of the forward exchange after layer l
        exchange_reverse(node_gradient);
        node_gradient.narrow(0, nlocal, nall - nlocal).zero_();
      }
      std::vector<torch::Tensor> inputs(geometry_leaves);
      if (l > 0) inputs.push_back(layer_inputs[l]);
      auto grads = torch::autograd::grad({layer_outputs[l]}, inputs, {node_gradient}, false, false, true);
      for (size_t k = 0; k < geometry_leaves.size(); ++k)
        if (grads[k].defined()) geometry_grads[k] = geometry_grads[k].defined() ? geometry_grads[k] + grads[k] : grads[k];
      if (l > 0) node_gradient = grads.back().defined() ? grads.back() : torch::zeros_like(layer_inputs[l]);
    }

    std::vector<torch::Tensor> outputs, grad_outputs;
    for (size_t k = 0; k < geometry_leaves.size(); ++k)
      if (geometry_grads[k].defined()) {
        outputs.push_back(geometry_outputs[k]);
        grad_outputs.push_back(geometry_grads[k]);
      }
    if (!outputs.empty() && num_edges > 0)
      edge_gradient = torch::autograd::grad(outputs, {edge_vectors}, grad_outputs, false, false, true)[0];
    bytes_ = 0.0;
    for (auto &t : layer_outputs) bytes_ += (double) t.nbytes();
  } catch (std::exception &e) {
    std::string what = e.what();
    error->one(FLERR, "Pair janus: model evaluation failed: {}", what.substr(0, what.find('\n')));
  }

  // energies (accumulated in double over owned atoms)
  auto energy = atom_energy.detach().to(torch::kFloat64).contiguous();
  const double *energy_data = energy.data_ptr<double>();
  if (eflag_global)
    for (int i = 0; i < nlocal; ++i) eng_vdwl += energy_data[i];
  if (eflag_atom)
    for (int i = 0; i < nlocal; ++i) eatom[i] += energy_data[i];

  if (!edge_gradient.defined()) return;
  auto gradient = edge_gradient.to(torch::kFloat64).contiguous();
  const double *g = gradient.data_ptr<double>();
  double v[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t k = 0; k < num_edges; ++k) {
    const int i = (int) centres[k], j = (int) neighbours[k];
    const double *gk = g + 3 * k;
    const double *r = vectors.data() + 3 * k;
    for (int d = 0; d < 3; ++d) {
      f[i][d] += gk[d];
      f[j][d] -= gk[d];
    }
    if (vflag_either) {
      // W = -r (x) dE/dr, symmetrised; order xx yy zz xy xz yz
      const double w[6] = {-r[0] * gk[0],
                           -r[1] * gk[1],
                           -r[2] * gk[2],
                           -0.5 * (r[0] * gk[1] + r[1] * gk[0]),
                           -0.5 * (r[0] * gk[2] + r[2] * gk[0]),
                           -0.5 * (r[1] * gk[2] + r[2] * gk[1])};
      for (int c = 0; c < 6; ++c) v[c] += w[c];
      if (vflag_atom)
        for (int c = 0; c < 6; ++c) {
          vatom[i][c] += 0.5 * w[c];
          vatom[j][c] += 0.5 * w[c];
        }
    }
  }
  if (vflag_global)
    for (int c = 0; c < 6; ++c) virial[c] += v[c];
}

double PairJanus::memory_usage()
{
  return Pair::memory_usage() + bytes_;
}
