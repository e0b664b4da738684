/* pair_style janus: the Janus machine-learning interatomic potential (TorchScript file)
   as a LAMMPS plugin. See docs/lammps.md for the input contract and the halo protocol. */

#ifndef LMP_PAIR_JANUS_H
#define LMP_PAIR_JANUS_H

#include "pair.h"

#include "janus_model.h"

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

  // LAMMPS's forward / reverse ghost communication of model rows (the janus::HaloExchange
  // that compute() hands to the model)
  void forward(torch::Tensor &rows);
  void reverse(torch::Tensor &rows);

 private:
  void allocate();
  void load_model(const std::string &path);
  int node_local_rank();

  janus::JanusModel model_;
  std::string model_path_;
  std::string device_spec_ = "auto";    // pair_style janus device ...
  int threads_ = 0;                      // pair_style janus threads ...; 0: libtorch's default
  std::string reduce_ = "auto";          // pair_style janus reduce auto|device|host
  std::vector<int64_t> type_z_;          // LAMMPS type -> atomic number (0: NULL, unmapped)

  torch::Tensor comm_rows_;       // [nall, F] rows being exchanged (contiguous)
  double bytes_ = 0.0;            // tensor memory of the latest compute()
};

}    // namespace LAMMPS_NS

#endif
