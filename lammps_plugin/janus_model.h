/* JanusModel: an exported Janus model -- a TorchScript file or an AOTInductor package (.pt2,
   `janus export --format aoti`) -- and its per-layer evaluation with a halo callback, independent of LAMMPS (the way DeePMD-kit's pair_deepmd.cpp sits on a
   backend class). PairJanus (pair_janus.cpp) only speaks LAMMPS: neighbour lists, ghost
   communication, forces and virials.

   The model lives on one torch device (CPU or a CUDA GPU); the inputs are built on the CPU
   and moved once per evaluation, halo rows travel through host memory (so any MPI works),
   and the results come back to the CPU in float64. */

#ifndef JANUS_MODEL_H
#define JANUS_MODEL_H

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace janus {

// a problem with the model file, its metadata or an evaluation: the message names it
class ModelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// the host's ghost communication, called between layers with host-memory rows [n_all, F]
// (owned rows first, then ghosts) in the model's dtype, contiguous
class HaloExchange {
 public:
  virtual ~HaloExchange() = default;
  virtual void forward(torch::Tensor &rows) = 0;    // ghost rows := their owners' rows
  virtual void reverse(torch::Tensor &rows) = 0;    // ghost rows summed into their owners' rows
};

struct Evaluation {
  torch::Tensor atom_energy;      // [n_local] float64, CPU: energies of the owned atoms
  torch::Tensor edge_gradient;    // [E, 3] float64, CPU: dE/d(edge vector); undefined without edges
                                  // or when the forces were reduced on the device (below)
  torch::Tensor forces;           // [n_all, 3] float64, CPU: -dE/dx of owned and ghost atoms, when
                                  // evaluate(..., reduce=true) reduced them on the model's device
  torch::Tensor virial;           // [6] float64, CPU, with `forces`: xx yy zz xy xz yz (LAMMPS order)
  double bytes = 0.0;             // memory of the layer outputs (for memory_usage)
};

int atomic_number(const std::string &symbol);    // 0 for an unknown symbol

// Keep freed memory in the process's heap (glibc: no mmap for large blocks, no trimming), so
// that an evaluation's large temporaries reuse pages instead of faulting fresh zeroed ones
// from the kernel each step (measured: half of a 10,976-atom step was system time). Skipped
// when JANUS_MALLOC=system or the user set MALLOC_MMAP_MAX_ / MALLOC_MMAP_THRESHOLD_ /
// MALLOC_TRIM_THRESHOLD_ (glibc's own variables). Returns whether it changed the settings.
// janus_potential.devices.keep_freed_memory is the Python twin.
bool keep_freed_memory();

// "auto" (CUDA when visible, else the CPU), "cpu", "cuda" or "cuda:N"; a bare CUDA device is
// the GPU of the node-local rank (ranks of a node may share one GPU). Throws ModelError.
torch::Device choose_device(const std::string &spec, int local_rank);

class JanusModel {
 public:
  static std::string read_file(const std::string &path);    // the file's bytes; throws ModelError
  static bool is_package(const std::string &bytes);          // an AOTInductor package (.pt2), by content
  // load from the file's bytes (read once by one rank and broadcast); checks format,
  // version, metadata and the weights' SHA-256; `name` is the path for messages
  // An AOTInductor package runs on the CPU (its functions were compiled for it).
  void load(const std::string &bytes, const std::string &name, const torch::Device &device);
  ~JanusModel();

  // `reduce`: sum the edge gradients into per-atom forces and the virial on the model's
  // device and bring back [n_all, 3] + [6] instead of [E, 3] (what a GPU wants: no per-edge
  // transfer, no per-edge host loop); ignored by the package, which returns edge gradients
  Evaluation evaluate(const torch::Tensor &species, const torch::Tensor &edge_index,
                      const torch::Tensor &edge_vectors, int64_t n_local, HaloExchange &halo, bool reduce = false);

  bool loaded() const { return loaded_; }
  bool compiled() const { return !package_.empty(); }    // an AOTInductor package
  double cutoff() const { return cutoff_; }
  int features() const { return features_; }
  int num_interactions() const { return num_interactions_; }
  torch::Dtype dtype() const { return dtype_; }
  const torch::Device &device() const { return device_; }
  const std::vector<int> &elements() const { return elements_; }

 private:
  torch::Tensor exchange(const torch::Tensor &rows, HaloExchange &halo, bool reverse);
  void load_package(const std::string &bytes, const std::string &path);
  void read_metadata(const std::string &text, const std::string &path, const std::string &format, int version);
  Evaluation evaluate_script(const torch::Tensor &species, const torch::Tensor &edge_index,
                             const torch::Tensor &edge_vectors, int64_t n_local, HaloExchange &halo, bool reduce);
  Evaluation evaluate_package(const torch::Tensor &species, const torch::Tensor &edge_index,
                              const torch::Tensor &edge_vectors, int64_t n_local, HaloExchange &halo);
  std::vector<torch::Tensor> run(const std::string &function, const std::vector<torch::Tensor> &inputs);

  torch::jit::Module module_;
  std::map<std::string, std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> package_;
  double three_body_cutoff_ = 0.0;
  bool loaded_ = false;
  double cutoff_ = 0.0;
  int num_interactions_ = 0;
  int features_ = 0;
  torch::Dtype dtype_ = torch::kFloat32;
  torch::Device device_ = torch::kCPU;
  std::vector<int> elements_;
};

}    // namespace janus

#endif
