/* JanusModel (janus_model.h): loading, checking and evaluating an exported Janus model. */

#include "janus_model.h"
#include "sha256.h"

#include "json.h"    // LAMMPS's bundled nlohmann::json (header only)

#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <sstream>

namespace janus {

namespace {

using json = LAMMPS_NS::json;

constexpr int FORMAT_VERSION = 2;

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

}    // namespace

int atomic_number(const std::string &symbol)
{
  for (int z = 1; z < NUM_ELEMENTS; ++z)
    if (symbol == ELEMENTS[z]) return z;
  return 0;
}

namespace {

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


std::string first_line(const std::string &what)
{
  return what.substr(0, what.find('\n'));
}

}    // namespace

torch::Device choose_device(const std::string &spec, int local_rank)
{
  const bool cuda = torch::cuda::is_available();
  if (spec == "cpu") return torch::kCPU;
  if (spec == "auto" && !cuda) return torch::kCPU;
  if (spec != "auto" && spec.rfind("cuda", 0) != 0)
    throw ModelError("device '" + spec + "' is not one of auto, cpu, cuda, cuda:N");
  if (!cuda)
    throw ModelError("device '" + spec + "': no CUDA GPU is visible to this process (or libtorch was built without CUDA)");
  const int count = (int) torch::cuda::device_count();
  if (spec == "auto" || spec == "cuda") return torch::Device(torch::kCUDA, (c10::DeviceIndex) (local_rank % count));
  torch::Device device(spec);    // "cuda:N"
  if (device.index() >= count)
    throw ModelError("device '" + spec + "': this process sees " + std::to_string(count) + " GPU(s)");
  return device;
}

std::string JanusModel::read_file(const std::string &path)
{
  std::ifstream file(path, std::ios::binary);
  if (!file.good()) throw ModelError("cannot open model file " + path + ": file does not exist or is not readable");
  return std::string(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

void JanusModel::load(const std::string &bytes, const std::string &path, const torch::Device &device)
{
  torch::jit::ExtraFilesMap extra{{"metadata.json", ""}};
  try {
    std::istringstream stream(bytes);
    module_ = torch::jit::load(stream, device, extra);
  } catch (std::exception &e) {
    throw ModelError("cannot load model file " + path + " (not a TorchScript file or corrupt): " + first_line(e.what()));
  }
  if (extra["metadata.json"].empty()) throw ModelError(path + " is not a Janus model file (no metadata.json)");
  try {
    json meta = json::parse(extra["metadata.json"]);
    if (meta.value("format", std::string()) != "janus-torchscript")
      throw ModelError(path + " is not a Janus model file (format is not janus-torchscript)");
    int version = meta.at("format_version").get<int>();
    if (version != FORMAT_VERSION)
      throw ModelError(path + " has format version " + std::to_string(version) + ", this plugin reads format version " +
                       std::to_string(FORMAT_VERSION) + "; re-export the model");
    cutoff_ = meta.at("cutoff").get<double>();
    num_interactions_ = meta.at("num_interactions").get<int>();
    features_ = meta.at("features").get<int>();
    std::string dtype = meta.at("dtype").get<std::string>();
    if (dtype == "float32")
      dtype_ = torch::kFloat32;
    else if (dtype == "float64")
      dtype_ = torch::kFloat64;
    else
      throw ModelError(path + " has unsupported dtype " + dtype);
    elements_.clear();
    for (const auto &symbol : meta.at("elements")) elements_.push_back(atomic_number(symbol.get<std::string>()));
    if (module_digest(module_) != meta.at("weights_sha256").get<std::string>())
      throw ModelError("model file " + path +
                       " is corrupt: its weights do not match the SHA-256 content hash in its metadata");
  } catch (json::exception &e) {
    throw ModelError(path + " has invalid metadata.json: " + e.what());
  }
  if (cutoff_ <= 0.0 || num_interactions_ < 1 || features_ < 1)
    throw ModelError(path + " has invalid metadata (cutoff " + std::to_string(cutoff_) + ", " +
                     std::to_string(num_interactions_) + " interactions, " + std::to_string(features_) + " features)");
  module_.eval();
  // Run the scripted graphs as written: the profiling executor's optimised graphs used more
  // memory and were not faster (the ASE calculator does the same, docs/model.md).
  torch::jit::setGraphExecutorOptimize(false);
  for (auto parameter : module_.parameters()) parameter.requires_grad_(false);
  device_ = device;
  loaded_ = true;
}

torch::Tensor JanusModel::exchange(const torch::Tensor &rows, HaloExchange &halo, bool reverse)
{
  // host memory in, host memory out: on the CPU this is the tensor itself (no copy)
  auto host = rows.to(torch::kCPU).contiguous();
  if (reverse)
    halo.reverse(host);
  else
    halo.forward(host);
  return host.to(device_);
}

Evaluation JanusModel::evaluate(const torch::Tensor &species_cpu, const torch::Tensor &edge_index_cpu,
                                const torch::Tensor &edge_vectors_cpu, int64_t nlocal, HaloExchange &halo)
{
  if (!loaded_) throw ModelError("no model loaded");
  Evaluation result;
  const int64_t nall = species_cpu.size(0);
  const int64_t num_edges = edge_index_cpu.size(1);
  auto species = species_cpu.to(device_);
  auto edge_index = edge_index_cpu.to(device_);
  auto edge_vectors = edge_vectors_cpu.to(device_, dtype_, false, true);
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
      auto h_out = interaction({(int64_t) l, h_in, species, geometry, nlocal}).toTupleRef().elements()[0].toTensor();
      layer_inputs.push_back(h_in);
      layer_outputs.push_back(h_out);
      h = h_out.detach().clone().contiguous();
      // halo exchange after every layer but the last: the readout needs owned rows only
      // (janus_potential.model.run_layers follows the same rule)
      if (l + 1 < num_interactions_) h = exchange(h, halo, false);
    }
    h.requires_grad_(true);
    atom_energy = module_.get_method("readout")({h.narrow(0, 0, nlocal), species.narrow(0, 0, nlocal), geometry}).toTensor();
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
        node_gradient = exchange(node_gradient, halo, true);
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
    for (auto &t : layer_outputs) result.bytes += (double) t.nbytes();
  } catch (ModelError &) {
    throw;
  } catch (std::exception &e) {
    throw ModelError(std::string("model evaluation failed: ") + first_line(e.what()));
  }
  result.atom_energy = atom_energy.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  if (edge_gradient.defined()) result.edge_gradient = edge_gradient.to(torch::kCPU, torch::kFloat64).contiguous();
  return result;
}

}    // namespace janus
