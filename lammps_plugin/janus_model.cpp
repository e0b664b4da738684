/* JanusModel (janus_model.h): loading, checking and evaluating an exported Janus model. */

#include "janus_model.h"
#include "sha256.h"

#include "json.h"    // LAMMPS's bundled nlohmann::json (header only)

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <malloc.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>

namespace janus {

namespace {

using json = LAMMPS_NS::json;

constexpr int FORMAT_VERSION = 2;            // janus-torchscript (janus_potential/export.py)
constexpr int PACKAGE_FORMAT_VERSION = 2;    // janus-aoti (janus_potential/aoti.py)
constexpr int64_t PACKAGE_MIN_SIZE = 2;      // aoti.MIN_SIZE: the package's sizes are at least 2

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

bool keep_freed_memory()
{
#if defined(__GLIBC__) && defined(M_MMAP_MAX)
  const char *setting = std::getenv("JANUS_MALLOC");
  if (setting && std::string(setting) == "system") return false;
  for (const char *own : {"MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"})
    if (std::getenv(own)) return false;
  // M_TRIM_THRESHOLD takes an int; glibc stores it as size_t, so -1 means "never trim"
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, -1) == 1;
#else
  return false;
#endif
}

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

JanusModel::~JanusModel() = default;

bool JanusModel::is_package(const std::string &bytes)
{
  // a zip archive with AOTInductor's entries, <function>/data/aotinductor/... (aoti.is_aoti_file)
  return bytes.size() > 4 && bytes.compare(0, 4, "PK\x03\x04") == 0 && bytes.find("/data/aotinductor/") != std::string::npos;
}

void JanusModel::read_metadata(const std::string &text, const std::string &path, const std::string &format, int version)
{
  try {
    json meta = json::parse(text);
    if (meta.value("format", std::string()) != format)
      throw ModelError(path + " is not a Janus model file (format is not " + format + ")");
    int found = meta.at("format_version").get<int>();
    if (found != version)
      throw ModelError(path + " has format version " + std::to_string(found) + ", this plugin reads format version " +
                       std::to_string(version) + "; re-export the model");
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
    if (format == "janus-torchscript") {
      if (module_digest(module_) != meta.at("weights_sha256").get<std::string>())
        throw ModelError("model file " + path +
                         " is corrupt: its weights do not match the SHA-256 content hash in its metadata");
    } else {
      three_body_cutoff_ = meta.at("three_body_cutoff").get<double>();
    }
  } catch (json::exception &e) {
    throw ModelError(path + " has invalid metadata: " + e.what());
  }
  if (cutoff_ <= 0.0 || num_interactions_ < 1 || features_ < 1)
    throw ModelError(path + " has invalid metadata (cutoff " + std::to_string(cutoff_) + ", " +
                     std::to_string(num_interactions_) + " interactions, " + std::to_string(features_) + " features)");
}

void JanusModel::load(const std::string &bytes, const std::string &path, const torch::Device &device)
{
  loaded_ = false;
  package_.clear();
  keep_freed_memory();
  if (is_package(bytes)) {
    if (device.type() != torch::kCPU)
      throw ModelError(path + " is an AOTInductor package compiled for the CPU: use `device cpu` (or auto) with it, "
                              "or the TorchScript export on a GPU");
    load_package(bytes, path);
    device_ = device;
    loaded_ = true;
    return;
  }
  torch::jit::ExtraFilesMap extra{{"metadata.json", ""}};
  try {
    std::istringstream stream(bytes);
    module_ = torch::jit::load(stream, device, extra);
  } catch (std::exception &e) {
    throw ModelError("cannot load model file " + path + " (not a TorchScript file or corrupt): " + first_line(e.what()));
  }
  if (extra["metadata.json"].empty()) throw ModelError(path + " is not a Janus model file (no metadata.json)");
  read_metadata(extra["metadata.json"], path, "janus-torchscript", FORMAT_VERSION);
  module_.eval();
  // Run the scripted graphs as written: the profiling executor's optimised graphs used more
  // memory and were not faster (the ASE calculator does the same, docs/model.md).
  torch::jit::setGraphExecutorOptimize(false);
  for (auto parameter : module_.parameters()) parameter.requires_grad_(false);
  device_ = device;
  loaded_ = true;
}

void JanusModel::load_package(const std::string &bytes, const std::string &path)
{
  // AOTInductor's loader reads a file: the bytes (read once and broadcast) go to a private
  // temporary file, removed once the functions are loaded (they are unpacked by then)
  const char *tmpdir = std::getenv("TMPDIR");
  std::string name = std::string(tmpdir && *tmpdir ? tmpdir : "/tmp") + "/janus-model-XXXXXX.pt2";
  std::vector<char> buffer(name.begin(), name.end());
  buffer.push_back(0);
  int fd = mkstemps(buffer.data(), 4);
  if (fd < 0) throw ModelError("cannot write a temporary copy of " + path + " in " + name.substr(0, name.rfind('/')));
  std::FILE *file = fdopen(fd, "wb");
  const bool written = file && std::fwrite(bytes.data(), 1, bytes.size(), file) == bytes.size();
  if (file) std::fclose(file);
  const std::string copy(buffer.data());
  try {
    if (!written) throw ModelError("cannot write a temporary copy of " + path + " to " + copy);
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> first;
    std::string text;
    try {
      first = std::make_unique<torch::inductor::AOTIModelPackageLoader>(copy, "prepare");
      auto metadata = first->get_metadata();
      if (!metadata.count("janus")) throw ModelError(path + " is an AOTInductor package but not a Janus model");
      text = metadata["janus"];
    } catch (ModelError &) {
      throw;
    } catch (std::exception &e) {
      throw ModelError("cannot load model package " + path + " (not a Janus package of format version " +
                       std::to_string(PACKAGE_FORMAT_VERSION) + ", or corrupt): " + first_line(e.what()));
    }
    read_metadata(text, path, "janus-aoti", PACKAGE_FORMAT_VERSION);
    package_["prepare"] = std::move(first);
    std::vector<std::string> names;
    try {
      names = json::parse(text).at("functions").get<std::vector<std::string>>();
    } catch (json::exception &e) {
      throw ModelError(path + " has invalid metadata: " + e.what());
    }
    for (const auto &function : names) {
      if (package_.count(function)) continue;
      try {
        package_[function] = std::make_unique<torch::inductor::AOTIModelPackageLoader>(copy, function);
      } catch (std::exception &e) {
        throw ModelError("cannot load function " + function + " of model package " + path + ": " + first_line(e.what()));
      }
    }
    for (int l = 0; l < num_interactions_; ++l)
      for (const auto &function : {"layer_" + std::to_string(l), "layer_" + std::to_string(l) + "_vjp"})
        if (!package_.count(function)) throw ModelError(path + " lacks the function " + function);
    for (const char *function : {"readout", "prepare_vjp"})
      if (!package_.count(function)) throw ModelError(path + " lacks the function " + std::string(function));
  } catch (...) {
    package_.clear();
    std::remove(copy.c_str());
    throw;
  }
  std::remove(copy.c_str());
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

Evaluation JanusModel::evaluate(const torch::Tensor &species, const torch::Tensor &edge_index,
                                const torch::Tensor &edge_vectors, int64_t nlocal, HaloExchange &halo, bool reduce)
{
  if (!loaded_) throw ModelError("no model loaded");
  if (compiled()) return evaluate_package(species, edge_index, edge_vectors, nlocal, halo);
  return evaluate_script(species, edge_index, edge_vectors, nlocal, halo, reduce);
}

Evaluation JanusModel::evaluate_script(const torch::Tensor &species_cpu, const torch::Tensor &edge_index_cpu,
                                       const torch::Tensor &edge_vectors_cpu, int64_t nlocal, HaloExchange &halo,
                                       bool reduce)
{
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
  if (reduce) {
    // forces f_i += g, f_j -= g per edge i -> j and the virial W = -sum r (x) g, symmetrised,
    // in float64 on the device (r: the edge vectors the model saw); janus_potential.model
    // reduces the same way for ASE
    auto forces = torch::zeros({nall, 3}, torch::TensorOptions().dtype(torch::kFloat64).device(device_));
    auto virial = torch::zeros({6}, forces.options());
    if (edge_gradient.defined()) {
      auto g = edge_gradient.detach().to(torch::kFloat64);
      forces.index_add_(0, edge_index[0], g).index_add_(0, edge_index[1], -g);
      auto m = torch::matmul(edge_vectors.detach().to(torch::kFloat64).t(), g);    // [3, 3]: sum r_a g_b
      virial = -torch::stack({m[0][0], m[1][1], m[2][2], 0.5 * (m[0][1] + m[1][0]), 0.5 * (m[0][2] + m[2][0]),
                              0.5 * (m[1][2] + m[2][1])});
    }
    result.forces = forces.to(torch::kCPU).contiguous();
    result.virial = virial.to(torch::kCPU).contiguous();
    return result;
  }
  if (edge_gradient.defined()) result.edge_gradient = edge_gradient.to(torch::kCPU, torch::kFloat64).contiguous();
  return result;
}

namespace {

// janus_potential.nn.geometry.short_edge_triplets: the ordered pairs (a, b), a != b, of edges
// shorter than `cutoff` that share a centre atom, grouped by centre (edges in index order within
// a group), a-major -- the same list in the same order as Python builds it
std::pair<torch::Tensor, torch::Tensor> short_edge_triplets(const torch::Tensor &centre, const torch::Tensor &vectors,
                                                            double cutoff)
{
  auto distance = at::linalg_vector_norm(vectors, 2, {1}).lt(cutoff);
  auto centre_cpu = centre.to(torch::kCPU).contiguous();
  auto is_short = distance.to(torch::kCPU).contiguous();
  const int64_t *c = centre_cpu.data_ptr<int64_t>();
  const bool *keep = is_short.data_ptr<bool>();
  std::vector<int64_t> edges;
  for (int64_t e = 0; e < centre_cpu.size(0); ++e)
    if (keep[e]) edges.push_back(e);
  std::stable_sort(edges.begin(), edges.end(), [c](int64_t a, int64_t b) { return c[a] < c[b]; });
  std::vector<int64_t> first, second;
  for (size_t start = 0; start < edges.size();) {
    size_t end = start;
    while (end < edges.size() && c[edges[end]] == c[edges[start]]) ++end;
    for (size_t a = start; a < end; ++a)
      for (size_t b = start; b < end; ++b)
        if (a != b) {
          first.push_back(edges[a]);
          second.push_back(edges[b]);
        }
    start = end;
  }
  auto options = torch::TensorOptions().dtype(torch::kLong);
  return {torch::tensor(first, options).to(centre.device()), torch::tensor(second, options).to(centre.device())};
}

// `rows` with `pad` zero rows appended (padding ghosts no edge touches, aoti.py)
torch::Tensor padded(const torch::Tensor &rows, int64_t pad)
{
  if (pad == 0) return rows.contiguous();
  auto shape = rows.sizes().vec();
  shape[0] = pad;
  return torch::cat({rows, torch::zeros(shape, rows.options())}).contiguous();
}

}    // namespace

std::vector<torch::Tensor> JanusModel::run(const std::string &function, const std::vector<torch::Tensor> &inputs)
{
  return package_.at(function)->run(inputs);
}

// The per-layer package (janus_potential/aoti.py) with the halo protocol of evaluate_script:
// forward through the layers with a forward exchange after each but the last, the readout
// with its gradient, then the layers' vector-Jacobian products in reverse with the reverse
// exchange, and the geometry's VJP to dE/d(edge vectors). Layer 0 embeds the species.
Evaluation JanusModel::evaluate_package(const torch::Tensor &species_in, const torch::Tensor &edge_index_in,
                                        const torch::Tensor &edge_vectors_in, int64_t nlocal, HaloExchange &halo)
{
  Evaluation result;
  const int64_t nall = species_in.size(0);
  const int64_t nghost = nall - nlocal;
  const int64_t num_edges = edge_index_in.size(1);
  torch::NoGradGuard no_grad;
  auto species = species_in.contiguous();
  auto edge_index = edge_index_in.contiguous();
  auto vectors = edge_vectors_in.to(dtype_).contiguous();
  auto [first, second] = short_edge_triplets(edge_index[0], vectors, three_body_cutoff_);
  const int64_t num_triplets = first.size(0);
  std::string small;
  for (auto [what, n] : {std::pair<const char *, int64_t>{"owned atoms", nlocal}, {"edges", num_edges},
                         {"triplets", num_triplets}})
    if (n < PACKAGE_MIN_SIZE) small += (small.empty() ? "" : ", ") + std::to_string(n) + " " + what;
  if (!small.empty())
    throw ModelError("the compiled model package needs at least 2 owned atoms, edges and triplets per rank; this rank "
                     "has " + small + ": use the TorchScript export (janus export --format torchscript) for it");
  const int64_t pad = std::max<int64_t>(0, PACKAGE_MIN_SIZE - nghost);
  torch::Tensor atom_energy, edge_gradient;
  try {
    auto centre = edge_index[0].contiguous(), neighbour = edge_index[1].contiguous();
    auto triplet_neighbour = neighbour.index_select(0, second).contiguous();
    auto geometry = run("prepare", {species, edge_index, vectors, first, second});    // radial, envelope, basis, ZBL
    std::vector<torch::Tensor> layer_geometry{centre, neighbour, geometry[0], geometry[1], first, triplet_neighbour,
                                              geometry[2]};
    auto species_owned = species.narrow(0, 0, nlocal).contiguous();
    std::vector<std::vector<torch::Tensor>> layer_inputs;
    auto x = species;    // layer 0 embeds the species
    for (int l = 0; l < num_interactions_; ++l) {
      std::vector<torch::Tensor> inputs{x.narrow(0, 0, nlocal).contiguous(), padded(x.narrow(0, nlocal, nghost), pad),
                                        species_owned};
      inputs.insert(inputs.end(), layer_geometry.begin(), layer_geometry.end());
      auto h = run("layer_" + std::to_string(l), inputs)[0].narrow(0, 0, nall).contiguous();
      layer_inputs.push_back(std::move(inputs));
      if (l + 1 < num_interactions_) h = exchange(h, halo, false);
      x = h;
      result.bytes += (double) h.nbytes();
    }
    auto readout = run("readout", {x.narrow(0, 0, nlocal).contiguous(), species_owned, centre, geometry[3]});
    atom_energy = readout[0];
    auto node_gradient = torch::zeros({nall, features_}, x.options());
    node_gradient.narrow(0, 0, nlocal).copy_(readout[1]);
    std::vector<torch::Tensor> geometry_gradient{torch::zeros_like(geometry[0]), torch::zeros_like(geometry[1]),
                                                 torch::zeros_like(geometry[2]), readout[2]};
    for (int l = num_interactions_ - 1; l >= 0; --l) {
      if (l + 1 < num_interactions_) {    // the adjoint of the forward exchange after layer l
        node_gradient = exchange(node_gradient.contiguous(), halo, true);
        node_gradient.narrow(0, nlocal, nghost).zero_();
      }
      auto inputs = layer_inputs[l];
      inputs.push_back(node_gradient.narrow(0, 0, nlocal).contiguous());
      inputs.push_back(padded(node_gradient.narrow(0, nlocal, nghost), pad));
      auto grads = run("layer_" + std::to_string(l) + "_vjp", inputs);
      const size_t offset = l > 0 ? 1 : 0;    // layer 0 has no node-feature input
      for (size_t k = 0; k < 3; ++k) geometry_gradient[k] += grads[offset + k];
      if (l > 0) node_gradient = grads[0].narrow(0, 0, nall).contiguous();
    }
    edge_gradient = run("prepare_vjp", {species, edge_index, vectors, first, second, geometry_gradient[0],
                                        geometry_gradient[1], geometry_gradient[2], geometry_gradient[3]})[0];
  } catch (ModelError &) {
    throw;
  } catch (std::exception &e) {
    throw ModelError(std::string("model evaluation failed: ") + first_line(e.what()));
  }
  result.atom_energy = atom_energy.to(torch::kCPU, torch::kFloat64).contiguous();
  result.edge_gradient = edge_gradient.to(torch::kCPU, torch::kFloat64).contiguous();
  return result;
}

}    // namespace janus
