// knlp CUDA graph shim for builds without the CUDA headers (build.rs picks
// this file then, graph.cpp otherwise): graph.cpp's entry points, each
// reporting that knlp was built without CUDA graph support.
#include <string>

namespace {
const std::string unsupported = "knlp was built without CUDA graph support";
}  // namespace

extern "C" {

const char* knlp_graph_last_error() { return unsupported.c_str(); }
int knlp_graph_supported() { return 0; }
int knlp_graph_new(void**) { return 1; }
int knlp_graph_enter_stream(void*) { return 1; }
int knlp_graph_exit_stream(void*) { return 1; }
int knlp_graph_capture_begin(void*) { return 1; }
int knlp_graph_capture_end(void*) { return 1; }
int knlp_graph_replay(void*) { return 1; }
int knlp_graph_current_device(int*) { return 1; }
int knlp_graph_stream_sync() { return 1; }
int knlp_graph_current_stream(int, void**) { return 1; }
void knlp_graph_free(void*) {}

}  // extern "C"
