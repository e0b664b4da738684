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

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>

using namespace LAMMPS_NS;

namespace {

constexpr double MIN_DISTANCE = 0.1;    // Angstrom: closer atoms are an error (janus_potential.graph)

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

// the model's halo callback: LAMMPS's ghost communication through the pair style
class LammpsHalo : public janus::HaloExchange {
 public:
  explicit LammpsHalo(PairJanus *pair) : pair_(pair) {}
  void forward(torch::Tensor &rows) override { pair_->forward(rows); }
  void reverse(torch::Tensor &rows) override { pair_->reverse(rows); }

 private:
  PairJanus *pair_;
};

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
  // pair_style janus [device auto|cpu|cuda|cuda:N] [threads N] [reduce auto|device|host]
  // reduce: where per-edge gradients become per-atom forces and the virial; auto = on the
  // model's device when it is a GPU (no per-edge transfer), in the host loop on the CPU
  for (int k = 0; k < narg; k += 2) {
    const std::string key = arg[k];
    if (k + 1 >= narg) error->all(FLERR, "Pair style janus: keyword '{}' needs a value", key);
    const std::string value = arg[k + 1];
    if (key == "device") {
      if (value != "auto" && value != "cpu" && value.rfind("cuda", 0) != 0)
        error->all(FLERR, "Pair style janus: device must be auto, cpu, cuda or cuda:N, got '{}'", value);
      device_spec_ = value;
    } else if (key == "reduce") {
      if (value != "auto" && value != "device" && value != "host")
        error->all(FLERR, "Pair style janus: reduce must be auto, device or host, got '{}'", value);
      reduce_ = value;
    } else if (key == "threads") {
      threads_ = utils::inumeric(FLERR, value, false, lmp);
      if (threads_ < 1) error->all(FLERR, "Pair style janus: threads must be at least 1, got {}", threads_);
    } else {
      error->all(FLERR,
                 "Pair style janus: unknown keyword '{}' (keywords: device, threads, reduce; the model file goes in "
                 "pair_coeff)",
                 key);
    }
  }
}

int PairJanus::node_local_rank()
{
  MPI_Comm node;
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, comm->me, MPI_INFO_NULL, &node);
  int rank = 0;
  MPI_Comm_rank(node, &rank);
  MPI_Comm_free(&node);
  return rank;
}

void PairJanus::load_model(const std::string &path)
{
  // rank 0 reads the file and broadcasts its bytes: one read of the file system per job
  std::string bytes, problem;
  if (comm->me == 0) {
    try {
      bytes = janus::JanusModel::read_file(path);
    } catch (janus::ModelError &e) {
      problem = e.what();
    }
  }
  int64_t size = problem.empty() ? (int64_t) bytes.size() : -1;
  MPI_Bcast(&size, 1, MPI_INT64_T, 0, world);
  if (size < 0) error->all(FLERR, "Pair janus: {}", problem);
  bytes.resize((size_t) size);
  for (int64_t offset = 0; offset < size; offset += (1 << 30)) {
    const int chunk = (int) std::min<int64_t>(size - offset, 1 << 30);
    MPI_Bcast(bytes.data() + offset, chunk, MPI_CHAR, 0, world);
  }
  if (threads_ > 0) torch::set_num_threads(threads_);
  try {
    // a compiled package runs on the CPU: `device auto` means the CPU for it
    const bool package = janus::JanusModel::is_package(bytes);
    model_.load(bytes, path, package && device_spec_ == "auto" ? torch::Device(torch::kCPU)
                                                               : janus::choose_device(device_spec_, node_local_rank()));
  } catch (janus::ModelError &e) {
    error->all(FLERR, "Pair janus: {}", e.what());
  }
  if (comm->me == 0)
    utils::logmesg(lmp, "Pair janus: {} {} ({} elements, cutoff {} A) on {}{}\n",
                   model_.compiled() ? "compiled package" : "model", path, model_.elements().size(),
                   model_.cutoff(), model_.device().str(),
                   threads_ > 0 ? fmt::format(", {} threads per rank", threads_) : std::string());
  model_path_ = path;
  comm_forward = model_.features();
  comm_reverse = model_.features();
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
    int z = janus::atomic_number(symbol);
    if (z == 0) error->all(FLERR, "Pair janus: '{}' (atom type {}) is not an element symbol", symbol, t);
    if (std::find(model_.elements().begin(), model_.elements().end(), z) == model_.elements().end())
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
  if (!model_.loaded()) error->all(FLERR, "Pair janus: no model loaded; use pair_coeff * * model.pt El1 El2 ...");
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
  return model_.cutoff();
}

void PairJanus::forward(torch::Tensor &rows)
{
  comm_rows_ = rows;
  comm->forward_comm(this);
  comm_rows_ = torch::Tensor();
}

void PairJanus::reverse(torch::Tensor &rows)
{
  comm_rows_ = rows;
  comm->reverse_comm(this);
  comm_rows_ = torch::Tensor();
}

int PairJanus::pack_forward_comm(int n, int *list, double *buf, int, int *)
{
  if (model_.dtype() == torch::kFloat64) return pack_rows(comm_rows_.data_ptr<double>(), model_.features(), n, list, 0, buf);
  return pack_rows(comm_rows_.data_ptr<float>(), model_.features(), n, list, 0, buf);
}

void PairJanus::unpack_forward_comm(int n, int first, double *buf)
{
  if (model_.dtype() == torch::kFloat64)
    unpack_rows(comm_rows_.data_ptr<double>(), model_.features(), n, nullptr, first, buf, false);
  else
    unpack_rows(comm_rows_.data_ptr<float>(), model_.features(), n, nullptr, first, buf, false);
}

int PairJanus::pack_reverse_comm(int n, int first, double *buf)
{
  if (model_.dtype() == torch::kFloat64) return pack_rows(comm_rows_.data_ptr<double>(), model_.features(), n, nullptr, first, buf);
  return pack_rows(comm_rows_.data_ptr<float>(), model_.features(), n, nullptr, first, buf);
}

void PairJanus::unpack_reverse_comm(int n, int *list, double *buf)
{
  if (model_.dtype() == torch::kFloat64)
    unpack_rows(comm_rows_.data_ptr<double>(), model_.features(), n, list, 0, buf, true);
  else
    unpack_rows(comm_rows_.data_ptr<float>(), model_.features(), n, list, 0, buf, true);
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
  const double cutoff_sq = model_.cutoff() * model_.cutoff();

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
  auto edge_vectors = torch::from_blob(vectors.data(), {num_edges, 3}, torch::kFloat64);

  // per-atom virials need the per-edge gradients on the host
  const bool reduce = !vflag_atom && (reduce_ == "device" || (reduce_ == "auto" && model_.device().is_cuda()));
  janus::Evaluation result;
  try {
    LammpsHalo halo(this);
    result = model_.evaluate(species, edge_index, edge_vectors, nlocal, halo, reduce);
  } catch (janus::ModelError &e) {
    error->one(FLERR, "Pair janus: {}", e.what());
  }
  bytes_ = result.bytes;

  // energies (accumulated in double over owned atoms)
  const double *energy_data = result.atom_energy.data_ptr<double>();
  if (eflag_global)
    for (int i = 0; i < nlocal; ++i) eng_vdwl += energy_data[i];
  if (eflag_atom)
    for (int i = 0; i < nlocal; ++i) eatom[i] += energy_data[i];

  if (result.forces.defined()) {    // reduced on the device: forces of owned and ghost atoms, the virial
    const double *fa = result.forces.data_ptr<double>();
    for (int i = 0; i < nall; ++i)
      for (int d = 0; d < 3; ++d) f[i][d] += fa[3 * i + d];
    if (vflag_global)
      for (int c = 0; c < 6; ++c) virial[c] += result.virial.data_ptr<double>()[c];
    return;
  }
  if (!result.edge_gradient.defined()) return;
  const double *g = result.edge_gradient.data_ptr<double>();
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
