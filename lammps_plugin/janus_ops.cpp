/* Fused edge operators of the Janus interaction layer (issue 11, item 4), registered with
   torch.library as janus::edge_scatter and janus::edge_dot, with their autograd in C++ so that
   eager Python, TorchScript and libtorch (the LAMMPS plugin) differentiate them the same way.

   edge_scatter(value [Nv, F], weight [E, G], gather [E], scatter [E], n_out) -> out [n_out, F]
       out[scatter[e], f] += value[gather[e], f] * weight[e, f / (F / G)]
   is the layer's message `index_add(centre, value[neighbour] * (weight @ group_to_channel))`
   without any [E, F] tensor: the edge-wise product is formed and summed row by row.

   edge_dot(a [Na, F], b [Nb, F], index_a [E], index_b [E], groups) -> r [E, G]
       r[e, g] = sum over the channels f of group g of a[index_a[e], f] * b[index_b[e], f]
   is the weight gradient of edge_scatter.

   Each one's backward is made of the two operators again (edge_scatter's value gradient is
   edge_scatter with gather and scatter swapped; its weight gradient is edge_dot; edge_dot's
   gradients are two edge_scatter calls), called through the dispatcher, so the backward is
   itself differentiable: force training's double backward works (checked by gradcheck and
   gradgradcheck in tests/test_ops.py). CPU kernels, float32 and float64. */

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_edges(const Tensor &index, int64_t edges, int64_t rows, const char *name)
{
  TORCH_CHECK(index.dim() == 1 && index.size(0) == edges, "janus ops: ", name, " must have shape [E] = [", edges, "]");
  TORCH_CHECK(index.scalar_type() == torch::kLong, "janus ops: ", name, " must be int64");
  if (edges > 0) {
    TORCH_CHECK(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < rows, "janus ops: ", name,
                " holds a row outside [0, ", rows, ")");
  }
}

// --------------------------------------------------------------------------- CPU kernels
Tensor edge_scatter_cpu(const Tensor &value_in, const Tensor &weight_in, const Tensor &gather_in,
                        const Tensor &scatter_in, int64_t n_out)
{
  TORCH_CHECK(value_in.dim() == 2 && weight_in.dim() == 2, "janus::edge_scatter: value [N, F] and weight [E, G]");
  TORCH_CHECK(value_in.scalar_type() == weight_in.scalar_type(), "janus::edge_scatter: value and weight dtypes differ");
  const int64_t features = value_in.size(1), groups = weight_in.size(1), edges = weight_in.size(0);
  TORCH_CHECK(groups > 0 && features % groups == 0, "janus::edge_scatter: F = ", features,
              " is not a multiple of G = ", groups);
  check_edges(gather_in, edges, value_in.size(0), "gather");
  check_edges(scatter_in, edges, n_out, "scatter");
  auto value = value_in.contiguous();
  auto weight = weight_in.contiguous();
  auto gather = gather_in.contiguous();
  auto scatter = scatter_in.contiguous();
  auto out = torch::zeros({n_out, features}, value.options());
  const int64_t width = features / groups;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "janus_edge_scatter", [&] {
    const scalar_t *v = value.data_ptr<scalar_t>();
    const scalar_t *w = weight.data_ptr<scalar_t>();
    const int64_t *gi = gather.data_ptr<int64_t>();
    const int64_t *si = scatter.data_ptr<int64_t>();
    scalar_t *o = out.data_ptr<scalar_t>();
    // threads own disjoint column blocks (groups), so the scatter needs no atomics
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t e = 0; e < edges; ++e) {
        const scalar_t *vrow = v + gi[e] * features;
        scalar_t *orow = o + si[e] * features;
        const scalar_t *wrow = w + e * groups;
        for (int64_t g = g0; g < g1; ++g) {
          const scalar_t weight_eg = wrow[g];
          for (int64_t f = g * width; f < (g + 1) * width; ++f) orow[f] += vrow[f] * weight_eg;
        }
      }
    });
  });
  return out;
}

Tensor edge_dot_cpu(const Tensor &a_in, const Tensor &b_in, const Tensor &index_a_in, const Tensor &index_b_in,
                    int64_t groups)
{
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(1),
              "janus::edge_dot: a [Na, F] and b [Nb, F]");
  TORCH_CHECK(a_in.scalar_type() == b_in.scalar_type(), "janus::edge_dot: a and b dtypes differ");
  const int64_t features = a_in.size(1), edges = index_a_in.size(0);
  TORCH_CHECK(groups > 0 && features % groups == 0, "janus::edge_dot: F = ", features, " is not a multiple of G = ",
              groups);
  check_edges(index_a_in, edges, a_in.size(0), "index_a");
  check_edges(index_b_in, edges, b_in.size(0), "index_b");
  auto a = a_in.contiguous();
  auto b = b_in.contiguous();
  auto ia = index_a_in.contiguous();
  auto ib = index_b_in.contiguous();
  auto out = torch::empty({edges, groups}, a.options());
  const int64_t width = features / groups;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "janus_edge_dot", [&] {
    const scalar_t *pa = a.data_ptr<scalar_t>();
    const scalar_t *pb = b.data_ptr<scalar_t>();
    const int64_t *pia = ia.data_ptr<int64_t>();
    const int64_t *pib = ib.data_ptr<int64_t>();
    scalar_t *o = out.data_ptr<scalar_t>();
    at::parallel_for(0, edges, 256, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const scalar_t *arow = pa + pia[e] * features;
        const scalar_t *brow = pb + pib[e] * features;
        for (int64_t g = 0; g < groups; ++g) {
          scalar_t sum = 0;
          for (int64_t f = g * width; f < (g + 1) * width; ++f) sum += arow[f] * brow[f];
          o[e * groups + g] = sum;
        }
      }
    });
  });
  return out;
}

// --------------------------------------------------------------------------- dispatcher calls
// n_out is a SymInt in the schema: under symbolic tracing (make_fx, the compiled training step
// of training/compiled.py) the row count stays a symbol instead of being specialised
using EdgeScatterSignature = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, c10::SymInt);

Tensor call_edge_scatter(const Tensor &value, const Tensor &weight, const Tensor &gather, const Tensor &scatter,
                         c10::SymInt n_out)
{
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("janus::edge_scatter", "").typed<EdgeScatterSignature>();
  return op.call(value, weight, gather, scatter, std::move(n_out));
}

Tensor call_edge_dot(const Tensor &a, const Tensor &b, const Tensor &index_a, const Tensor &index_b, int64_t groups)
{
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("janus::edge_dot", "").typed<decltype(edge_dot_cpu)>();
  return op.call(a, b, index_a, index_b, groups);
}

// --------------------------------------------------------------------------- autograd
class EdgeScatter : public torch::autograd::Function<EdgeScatter> {
 public:
  static Tensor forward(AutogradContext *ctx, const Tensor &value, const Tensor &weight, const Tensor &gather,
                        const Tensor &scatter, c10::SymInt n_out)
  {
    ctx->save_for_backward({value, weight, gather, scatter});
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_edge_scatter(value, weight, gather, scatter, n_out);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    auto saved = ctx->get_saved_variables();
    const Tensor &value = saved[0], &weight = saved[1], &gather = saved[2], &scatter = saved[3];
    const Tensor &grad = grads[0];
    Tensor grad_value, grad_weight;
    if (ctx->needs_input_grad(0)) grad_value = call_edge_scatter(grad, weight, scatter, gather, value.sym_size(0));
    if (ctx->needs_input_grad(1)) grad_weight = call_edge_dot(grad, value, scatter, gather, weight.sym_size(1).guard_int(__FILE__, __LINE__));
    return {grad_value, grad_weight, Tensor(), Tensor(), Tensor()};
  }
};

class EdgeDot : public torch::autograd::Function<EdgeDot> {
 public:
  static Tensor forward(AutogradContext *ctx, const Tensor &a, const Tensor &b, const Tensor &index_a,
                        const Tensor &index_b, int64_t groups)
  {
    ctx->save_for_backward({a, b, index_a, index_b});
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_edge_dot(a, b, index_a, index_b, groups);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    auto saved = ctx->get_saved_variables();
    const Tensor &a = saved[0], &b = saved[1], &index_a = saved[2], &index_b = saved[3];
    const Tensor &grad = grads[0];
    Tensor grad_a, grad_b;
    if (ctx->needs_input_grad(0)) grad_a = call_edge_scatter(b, grad, index_b, index_a, a.sym_size(0));
    if (ctx->needs_input_grad(1)) grad_b = call_edge_scatter(a, grad, index_a, index_b, b.sym_size(0));
    return {grad_a, grad_b, Tensor(), Tensor(), Tensor()};
  }
};

Tensor edge_scatter_autograd(const Tensor &value, const Tensor &weight, const Tensor &gather, const Tensor &scatter,
                             c10::SymInt n_out)
{
  return EdgeScatter::apply(value, weight, gather, scatter, n_out);
}

Tensor edge_dot_autograd(const Tensor &a, const Tensor &b, const Tensor &index_a, const Tensor &index_b, int64_t groups)
{
  return EdgeDot::apply(a, b, index_a, index_b, groups);
}

}    // namespace

TORCH_LIBRARY(janus, m)
{
  m.def("edge_scatter(Tensor value, Tensor weight, Tensor gather, Tensor scatter, SymInt n_out) -> Tensor");
  m.def("edge_dot(Tensor a, Tensor b, Tensor index_a, Tensor index_b, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(janus, CPU, m)
{
  m.impl("edge_scatter", edge_scatter_cpu);
  m.impl("edge_dot", edge_dot_cpu);
}

TORCH_LIBRARY_IMPL(janus, Autograd, m)
{
  m.impl("edge_scatter", edge_scatter_autograd);
  m.impl("edge_dot", edge_dot_autograd);
}
