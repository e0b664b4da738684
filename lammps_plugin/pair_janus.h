/* pair_style janus: the Janus machine-learning interatomic potential (TorchScript file)
   as a LAMMPS plugin. See docs/lammps.md for the input contract and the halo protocol. */

#ifndef LMP_PAIR_JANUS_H
#define LMP_PAIR_JANUS_H

#include "pair.h"

#include <torch/script.h>

#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairJanus : public Pair {
 public:
  PairJanus(class LAMMPS *);
  ~PairJanus() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;

  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;
  double memory_usage() override;

 private:
  void allocate();
  void load_model(const std::string &path);
  void exchange_forward(torch::Tensor &rows);
  void exchange_reverse(torch::Tensor &rows);

  torch::jit::Module module_;
  bool model_loaded_ = false;
  std::string model_path_;
  double cutoff_ = 0.0;
  int num_interactions_ = 0;
  int features_ = 0;
  torch::Dtype dtype_ = torch::kFloat32;
  std::vector<int> covered_;      // atomic numbers the model covers
  std::vector<int64_t> type_z_;   // LAMMPS type -> atomic number (0: NULL, unmapped)

  torch::Tensor comm_rows_;       // [nall, F] rows being exchanged (contiguous)
  double bytes_ = 0.0;            // tensor memory of the latest compute()
};

}    // namespace LAMMPS_NS

#endif
