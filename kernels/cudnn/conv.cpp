// cuDNN convolution forward (2-D per frame or 3-D, NCDHW contiguous, groups 1) behind a small
// C ABI, on the header-only cudnn-frontend graph API, dynamically loaded like sdpa.cpp (which
// owns lava_cudnn_open and the dlopen handle). Compute in f32; x/w/y share one io dtype
// (bf16, f16 or f32); the bias, when fused, is added in f32 before the one rounding to y.
// One LavaConv per shape: the graph is built, checked and planned once, then executed;
// optionally every candidate engine is timed on the first run (cudnn-frontend autotune).
//
// Build alone: as sdpa.cpp.
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <unordered_map>

#include <cudnn_frontend.h>

namespace fe = cudnn_frontend;

namespace {
thread_local std::string conv_error;

int fail(std::string const &msg) {
    conv_error = msg;
    return 1;
}

fe::DataType_t dtype_of(int code) {
    switch (code) {
        case 1: return fe::DataType_t::BFLOAT16;
        case 2: return fe::DataType_t::HALF;
        default: return fe::DataType_t::FLOAT;
    }
}

std::vector<int64_t> contiguous(std::vector<int64_t> const &d) {
    std::vector<int64_t> s(d.size(), 1);
    for (int i = (int)d.size() - 2; i >= 0; --i) s[i] = s[i + 1] * d[i + 1];
    return s;
}

// Strides of [n, c, d, h, w] stored as [n, d, h, w, c] (channels last).
std::vector<int64_t> channels_last(std::vector<int64_t> const &d) {
    int64_t c = d[1];
    return {d[2] * d[3] * d[4] * c, 1, d[3] * d[4] * c, d[4] * c, c};
}

enum : int64_t { UID_X = 1, UID_W = 2, UID_B = 3, UID_Y = 4 };
}  // namespace

struct LavaConv {
    cudnnHandle_t handle = nullptr;
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
    bool bias = false;
    bool tune = false;  // autotune on the first run, then false
};

extern "C" const char *lava_cudnn_conv_last_error() { return conv_error.c_str(); }

// x [n, ci, d, h, w], w [co, ci, kd, kh, kw], y [n, co, od, oh, ow], all contiguous (or all
// channels last: x [n, d, h, w, ci], w [co, kd, kh, kw, ci], y [n, od, oh, ow, co]); pads per
// spatial axis (before / after), strides per axis. bias [co] is fused when `with_bias`.
// `dtype`: 0 f32, 1 bf16, 2 f16 (x, w, bias, y). `tune`: build every candidate plan and time
// them on the first run. *workspace: the bytes the first run needs (the autotune maximum).
extern "C" int lava_cudnn_conv_create(const int64_t *xd, const int64_t *wd, const int64_t *yd,
                                      const int64_t *pre, const int64_t *post, const int64_t *stride,
                                      int dtype, int with_bias, int tune, int cl, LavaConv **out,
                                      int64_t *workspace) {
    if (fe::cudnn_dlhandle == nullptr) return fail("cuDNN not opened");
    auto p = std::make_unique<LavaConv>();
    p->bias = with_bias != 0;
    p->tune = tune != 0;
    try {
        if (fe::detail::create_handle(&p->handle) != CUDNN_STATUS_SUCCESS) return fail("cudnnCreate failed");
        auto g = std::make_shared<fe::graph::Graph>();
        auto io = dtype_of(dtype);
        g->set_io_data_type(io)
            .set_intermediate_data_type(fe::DataType_t::FLOAT)
            .set_compute_data_type(fe::DataType_t::FLOAT);
        std::vector<int64_t> xv(xd, xd + 5), wv(wd, wd + 5), yv(yd, yd + 5);
        auto strides = [&](std::vector<int64_t> const &d) { return cl ? channels_last(d) : contiguous(d); };
        auto x = g->tensor(fe::graph::Tensor_attributes().set_name("x").set_uid(UID_X).set_dim(xv).set_stride(
            strides(xv)).set_data_type(io));
        auto w = g->tensor(fe::graph::Tensor_attributes().set_name("w").set_uid(UID_W).set_dim(wv).set_stride(
            strides(wv)).set_data_type(io));
        auto opts = fe::graph::Conv_fprop_attributes()
                        .set_name("conv")
                        .set_pre_padding({pre[0], pre[1], pre[2]})
                        .set_post_padding({post[0], post[1], post[2]})
                        .set_stride({stride[0], stride[1], stride[2]})
                        .set_dilation({1, 1, 1})
                        .set_compute_data_type(fe::DataType_t::FLOAT);
        auto y = g->conv_fprop(x, w, opts);
        if (p->bias) {
            std::vector<int64_t> bd = {1, yv[1], 1, 1, 1};
            auto b = g->tensor(fe::graph::Tensor_attributes().set_name("bias").set_uid(UID_B).set_dim(bd).set_stride(
                contiguous(bd)).set_data_type(io));
            auto add = fe::graph::Pointwise_attributes()
                           .set_name("bias")
                           .set_mode(fe::PointwiseMode_t::ADD)
                           .set_compute_data_type(fe::DataType_t::FLOAT);
            y->set_data_type(fe::DataType_t::FLOAT);
            y = g->pointwise(y, b, add);
        }
        y->set_output(true).set_uid(UID_Y).set_dim(yv).set_stride(strides(yv)).set_data_type(io);
        fe::error_t e;
        if ((e = g->validate()).is_bad()) return fail("validate: " + e.get_message());
        if ((e = g->build_operation_graph(p->handle)).is_bad()) return fail("build_operation_graph: " + e.get_message());
        if ((e = g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK})).is_bad())
            return fail("create_execution_plans: " + e.get_message());
        if ((e = g->check_support(p->handle)).is_bad()) return fail("check_support: " + e.get_message());
        auto policy = p->tune ? fe::BuildPlanPolicy_t::ALL : fe::BuildPlanPolicy_t::HEURISTICS_CHOICE;
        if ((e = g->build_plans(p->handle, policy)).is_bad()) return fail("build_plans: " + e.get_message());
        int64_t ws = p->tune ? g->get_autotune_workspace_size() : 0;
        if (!p->tune && (e = g->get_workspace_size(ws)).is_bad())
            return fail("get_workspace_size: " + e.get_message());
        p->graph = g;
        p->workspace = ws;
    } catch (std::exception const &ex) {
        return fail(std::string("exception: ") + ex.what());
    }
    *workspace = p->workspace;
    *out = p.release();
    return 0;
}

// Queue the convolution on `stream`. On a plan made with `tune`, the first call times every
// candidate (synchronising the device) and keeps the fastest; *workspace is then set to the
// bytes later runs need (otherwise left alone). 0 on success.
extern "C" int lava_cudnn_conv_run(LavaConv *p, void *stream, void *x, void *w, void *bias, void *y,
                                   void *workspace, int64_t *next_workspace) {
    try {
        if (fe::detail::set_stream(p->handle, static_cast<cudaStream_t>(stream)) != CUDNN_STATUS_SUCCESS)
            return fail("cudnnSetStream failed");
        std::unordered_map<int64_t, void *> pack = {{UID_X, x}, {UID_W, w}, {UID_Y, y}};
        if (p->bias) pack[UID_B] = bias;
        if (p->tune) {
            p->tune = false;
            auto e = p->graph->autotune(p->handle, pack, workspace);
            if (e.is_bad()) return fail("autotune: " + e.get_message());
            int64_t ws = 0;
            if ((e = p->graph->get_workspace_size(ws)).is_bad())
                return fail("get_workspace_size: " + e.get_message());
            p->workspace = ws;
            *next_workspace = ws;
        }
        auto e = p->graph->execute(p->handle, pack, workspace);
        if (e.is_bad()) return fail("execute: " + e.get_message());
    } catch (std::exception const &ex) {
        return fail(std::string("exception: ") + ex.what());
    }
    return 0;
}

// The chosen engine's name (for logs); empty before a plan exists.
extern "C" const char *lava_cudnn_conv_plan_name(LavaConv *p) {
    static thread_local std::string tag;
    tag.clear();
    try {
        if (p && p->graph) {
            auto e = p->graph->get_plan_name(tag);
            if (e.is_bad()) tag = "?";
        }
    } catch (std::exception const &) {
        tag = "?";
    }
    return tag.c_str();
}

extern "C" void lava_cudnn_conv_destroy(LavaConv *p) {
    if (p == nullptr) return;
    if (p->handle != nullptr) fe::detail::destroy_handle(p->handle);
    delete p;
}
