// cuDNN scaled-dot-product attention (forward, inference, non-causal) behind a small C ABI,
// built on the header-only cudnn-frontend with NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING: no
// CUDA or cuDNN library is needed at link time; libcudnn.so.9 is dlopen'ed by
// lava_cudnn_open, libcudart/libcuda by the frontend itself. bf16 in/out, f32 softmax.
// One LavaSdpa per shape: the graph is built, checked and planned once, then executed.
//
// Build alone (headers from PyPI: nvidia-cudnn-frontend, nvidia-cudnn-cu13, nvidia-cuda-runtime):
//   g++ -std=c++17 -O2 -c -DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING -I<fe>/include \
//       -I<site>/nvidia/cudnn/include -I<site>/nvidia/cu13/include sdpa.cpp
#include <dlfcn.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <unordered_map>

#include <cudnn_frontend.h>

namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;
}
namespace fe = cudnn_frontend;

namespace {
thread_local std::string last_error;

int fail(std::string const &msg) {
    last_error = msg;
    return 1;
}
}  // namespace

struct LavaSdpa {
    cudnnHandle_t handle = nullptr;
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
};

extern "C" const char *lava_cudnn_last_error() { return last_error.c_str(); }

// dlopen cuDNN once per process (`name` such as "libcudnn.so.9"); 0 on success.
extern "C" int lava_cudnn_open(const char *name) {
    if (fe::cudnn_dlhandle != nullptr) return 0;
    void *h = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
    if (h == nullptr) {
        const char *e = dlerror();
        return fail(std::string("dlopen ") + name + ": " + (e ? e : "unknown error"));
    }
    fe::cudnn_dlhandle = h;
    return 0;
}

extern "C" size_t lava_cudnn_version() {
    return fe::cudnn_dlhandle ? fe::detail::get_backend_version() : 0;
}

// Build the SDPA graph for q [b, h, sq, d], k/v [b, h, skv, d], o like q, with element
// strides {batch, head, token, 1} per tensor. On success *out owns the plan and *workspace
// is the bytes it needs. The current CUDA context must be the target device's.
extern "C" int lava_cudnn_sdpa_create(int64_t b, int64_t h, int64_t sq, int64_t skv, int64_t d,
                                      const int64_t *qs, const int64_t *ks, const int64_t *vs,
                                      const int64_t *os, float scale, LavaSdpa **out,
                                      int64_t *workspace) {
    if (fe::cudnn_dlhandle == nullptr) return fail("cuDNN not opened");
    auto p = std::make_unique<LavaSdpa>();
    try {
        if (fe::detail::create_handle(&p->handle) != CUDNN_STATUS_SUCCESS) return fail("cudnnCreate failed");
        auto g = std::make_shared<fe::graph::Graph>();
        g->set_io_data_type(fe::DataType_t::BFLOAT16)
            .set_intermediate_data_type(fe::DataType_t::FLOAT)
            .set_compute_data_type(fe::DataType_t::FLOAT);
        auto tensor = [&](char const *name, int64_t uid, int64_t s, int64_t const *st) {
            return g->tensor(fe::graph::Tensor_attributes()
                                 .set_name(name)
                                 .set_uid(uid)
                                 .set_dim({b, h, s, d})
                                 .set_stride({st[0], st[1], st[2], 1}));
        };
        auto q = tensor("Q", 1, sq, qs);
        auto k = tensor("K", 2, skv, ks);
        auto v = tensor("V", 3, skv, vs);
        auto opts = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(false).set_attn_scale(scale);
        auto [o, stats] = g->sdpa(q, k, v, opts);
        (void)stats;
        o->set_output(true).set_uid(4).set_dim({b, h, sq, d}).set_stride({os[0], os[1], os[2], 1});
        fe::error_t e;
        if ((e = g->validate()).is_bad()) return fail("validate: " + e.get_message());
        if ((e = g->build_operation_graph(p->handle)).is_bad()) return fail("build_operation_graph: " + e.get_message());
        if ((e = g->create_execution_plans({fe::HeurMode_t::A})).is_bad())
            return fail("create_execution_plans: " + e.get_message());
        if ((e = g->check_support(p->handle)).is_bad()) return fail("check_support: " + e.get_message());
        if ((e = g->build_plans(p->handle, fe::BuildPlanPolicy_t::HEURISTICS_CHOICE)).is_bad())
            return fail("build_plans: " + e.get_message());
        int64_t ws = 0;
        if ((e = g->get_workspace_size(ws)).is_bad()) return fail("get_workspace_size: " + e.get_message());
        p->graph = g;
        p->workspace = ws;
    } catch (std::exception const &ex) {
        return fail(std::string("exception: ") + ex.what());
    }
    *workspace = p->workspace;
    *out = p.release();
    return 0;
}

// Queue the attention on `stream` (a CUstream / cudaStream_t). 0 on success.
extern "C" int lava_cudnn_sdpa_run(LavaSdpa *p, void *stream, void *q, void *k, void *v, void *o,
                                   void *workspace) {
    try {
        if (fe::detail::set_stream(p->handle, static_cast<cudaStream_t>(stream)) != CUDNN_STATUS_SUCCESS)
            return fail("cudnnSetStream failed");
        std::unordered_map<int64_t, void *> pack = {{1, q}, {2, k}, {3, v}, {4, o}};
        auto e = p->graph->execute(p->handle, pack, workspace);
        if (e.is_bad()) return fail("execute: " + e.get_message());
    } catch (std::exception const &ex) {
        return fail(std::string("exception: ") + ex.what());
    }
    return 0;
}

extern "C" void lava_cudnn_sdpa_destroy(LavaSdpa *p) {
    if (p == nullptr) return;
    if (p->handle != nullptr) fe::detail::destroy_handle(p->handle);
    delete p;
}
