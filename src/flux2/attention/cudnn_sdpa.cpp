// cuDNN fused scaled-dot-product attention (flash attention in cuDNN 9) for the DiT, through the
// cudnn-frontend graph API. Built by src/build.rs only with the `cudnn-sdpa` cargo feature.
//
// cuDNN and the CUDA runtime are opened with dlopen (the frontend's dynamic-loading mode), never
// linked: a GPU box without cuDNN still starts, the Rust side sees an error from the first call,
// and the self-check falls back to the naive attention. Every entry point catches C++ exceptions
// and returns a message instead: nothing may unwind into Rust.
//
// One graph per (device, dtype, B, H, S, D), built on first use and cached: the DiT runs one
// sequence length per image size and reference count. Requests choose those, so the cache is
// bounded (MAX_PLANS, then it starts over) rather than left to grow with every new size. A plan
// may still be running on the stream, so the cache is only cleared once the caller has
// synchronised it (prepare answers CACHE_FULL first).

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include <cudnn_frontend.h>

namespace cudnn_frontend {
// The frontend resolves every cudnn* symbol from this handle (dynamic-loading mode).
void *cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

namespace {

namespace fe = cudnn_frontend;

constexpr int64_t UID_Q = 1, UID_K = 2, UID_V = 3, UID_O = 4;

using Key = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t>;

struct Plan {
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
};

std::mutex mu;
std::map<int, cudnnHandle_t> handles;  // per device ordinal
std::map<Key, Plan> plans;
constexpr size_t MAX_PLANS = 64;
constexpr int CACHE_FULL = 2;

void write_error(char *buf, size_t len, const std::string &msg) {
    if (buf == nullptr || len == 0) return;
    size_t n = msg.size() < len - 1 ? msg.size() : len - 1;
    std::memcpy(buf, msg.data(), n);
    buf[n] = '\0';
}

struct Failure {
    std::string message;
};

void check(fe::error_t status, const char *step) {
    if (status.is_bad()) throw Failure{std::string(step) + ": " + status.get_message()};
}

void check_status(cudnnStatus_t status, const char *step) {
    if (status != CUDNN_STATUS_SUCCESS)
        throw Failure{std::string(step) + " returned cuDNN status " + std::to_string(int(status))};
}

// cuDNN 9's libcudnn.so.9 is a loader that opens its sub-libraries at the first call and aborts
// the process when one is missing, so the one every call here needs, the graph API, is opened
// first: from the loader's own folder, as the loader looks, then from the search path.
void require_graph_library(void *loader, const std::string &name) {
    std::string dir;
    Dl_info info{};
    void *symbol = dlsym(loader, "cudnnGetVersion");
    if (symbol != nullptr && dladdr(symbol, &info) != 0 && info.dli_fname != nullptr) {
        std::string path(info.dli_fname);
        auto slash = path.rfind('/');
        if (slash != std::string::npos) dir = path.substr(0, slash + 1);
    }
    const char *graph = "libcudnn_graph.so.9";
    if (!dir.empty() && dlopen((dir + graph).c_str(), RTLD_NOW | RTLD_LOCAL) != nullptr) return;
    dlerror();
    if (dlopen(graph, RTLD_NOW | RTLD_LOCAL) != nullptr) return;
    const char *e = dlerror();
    throw Failure{name + " is there but incomplete: " + graph + " cannot be opened (" + (e ? e : "unknown error") +
                  "); install all of cuDNN 9"};
}

void open_library(const char *name) {
    if (fe::cudnn_dlhandle != nullptr) return;
    dlerror();
    void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
        const char *e = dlerror();
        throw Failure{std::string("dlopen ") + name + ": " + (e ? e : "unknown error")};
    }
    try {
        require_graph_library(h, name);
    } catch (...) {
        dlclose(h);
        throw;
    }
    fe::cudnn_dlhandle = h;
}

cudnnHandle_t handle_for(int device) {
    auto it = handles.find(device);
    if (it != handles.end()) return it->second;
    cudnnHandle_t h = nullptr;
    check_status(fe::detail::create_handle(&h), "cudnnCreate");
    handles.emplace(device, h);
    return h;
}

fe::DataType_t io_type(int dtype) {
    switch (dtype) {
        case 0:
            return fe::DataType_t::BFLOAT16;
        case 1:
            return fe::DataType_t::HALF;
        default:
            throw Failure{"dtype code " + std::to_string(dtype) + " is neither bf16 (0) nor f16 (1)"};
    }
}

// Q, K, V are [B, H, S, D] contiguous; O is written as [B, S, H, D] (what the DiT's output
// projection reads as [B, S, H*D]) through its strides, so no transpose follows. Q is already
// multiplied by 1/sqrt(D), hence attn_scale 1. Softmax statistics are not generated (inference).
struct CacheFull {};

Plan &plan_for(cudnnHandle_t handle, int device, int dtype, int64_t b, int64_t h, int64_t s, int64_t d,
               bool may_evict) {
    Key key{device, dtype, b, h, s, d};
    auto it = plans.find(key);
    if (it != plans.end()) return it->second;
    if (plans.size() >= MAX_PLANS) {
        if (!may_evict) throw CacheFull{};
        plans.clear();
    }

    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(io_type(dtype))
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    std::vector<int64_t> dims{b, h, s, d};
    std::vector<int64_t> bhsd{h * s * d, s * d, d, 1};
    std::vector<int64_t> bshd{s * h * d, d, h * d, 1};
    auto input = [&](const char *name, int64_t uid) {
        return graph->tensor(
            fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(dims).set_stride(bhsd));
    };
    auto q = input("Q", UID_Q), k = input("K", UID_K), v = input("V", UID_V);
    auto options = fe::graph::SDPA_attributes().set_name("joint_attention").set_generate_stats(false).set_attn_scale(1.0f);
    auto outputs = graph->sdpa(q, k, v, options);
    outputs[0]->set_output(true).set_dim(dims).set_stride(bshd).set_uid(UID_O);

    check(graph->validate(), "validate");
    check(graph->build_operation_graph(handle), "build_operation_graph");
    check(graph->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
    check(graph->check_support(handle), "check_support");
    check(graph->build_plans(handle), "build_plans");
    Plan plan;
    plan.graph = graph;
    plan.workspace = graph->get_workspace_size();
    return plans.emplace(key, std::move(plan)).first->second;
}

template <typename F>
int guarded(char *err, size_t err_len, F &&body) {
    try {
        std::lock_guard<std::mutex> lock(mu);
        body();
        return 0;
    } catch (const CacheFull &) {
        write_error(err, err_len, "plan cache full: synchronise the stream, then prepare with may_evict");
        return CACHE_FULL;
    } catch (const Failure &f) {
        write_error(err, err_len, f.message);
    } catch (const std::exception &e) {
        write_error(err, err_len, std::string("exception: ") + e.what());
    } catch (...) {
        write_error(err, err_len, "unknown C++ exception");
    }
    return 1;
}

}  // namespace

extern "C" {

// Opens cuDNN (`library`, e.g. "libcudnn.so.9") and reports its version (e.g. 92801).
int imagegen_cudnn_sdpa_open(const char *library, int64_t *version, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        open_library(library);
        *version = fe::detail::get_backend_version();
    });
}

// Builds (or finds) the graph for this shape and reports the workspace it needs in bytes.
// The caller's CUDA context must be current on this thread. Returns CACHE_FULL (2) when a new
// graph would need the cache cleared and `may_evict` is 0: synchronise the stream, call again
// with 1.
int imagegen_cudnn_sdpa_prepare(int device, int dtype, int64_t b, int64_t h, int64_t s, int64_t d,
                                int may_evict, int64_t *workspace, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        if (fe::cudnn_dlhandle == nullptr) throw Failure{"cuDNN is not open"};
        cudnnHandle_t handle = handle_for(device);
        *workspace = plan_for(handle, device, dtype, b, h, s, d, may_evict != 0).workspace;
    });
}

// Enqueues the attention on `stream`. q, k, v, o are device pointers; `workspace` holds at least
// what prepare reported (may be null when that was 0).
int imagegen_cudnn_sdpa_run(int device, void *stream, int dtype, int64_t b, int64_t h, int64_t s, int64_t d,
                            const void *q, const void *k, const void *v, void *o, void *workspace, char *err,
                            size_t err_len) {
    return guarded(err, err_len, [&] {
        if (fe::cudnn_dlhandle == nullptr) throw Failure{"cuDNN is not open"};
        cudnnHandle_t handle = handle_for(device);
        Plan &plan = plan_for(handle, device, dtype, b, h, s, d, false);  // prepared just before
        check_status(fe::detail::set_stream(handle, static_cast<cudaStream_t>(stream)), "cudnnSetStream");
        std::unordered_map<int64_t, void *> pack{
            {UID_Q, const_cast<void *>(q)}, {UID_K, const_cast<void *>(k)}, {UID_V, const_cast<void *>(v)}, {UID_O, o}};
        check(plan.graph->execute(handle, pack, workspace), "execute");
    });
}

}  // extern "C"
