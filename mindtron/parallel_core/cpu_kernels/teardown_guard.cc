// A fault handler for the end of an msrun worker's life (see mindtron/parallel_core/teardown.py): once
// armed, a SIGSEGV or SIGBUS on any thread writes one line to stderr and ends the process with status 0.
// Only async-signal-safe calls (write, _exit) run inside the handler.
#include <csignal>
#include <unistd.h>

namespace {

const char kMessage[] =
    "mindtron: a fault in MindSpore's teardown after this worker's work was done (MindSpore 2.10's cluster "
    "finalize races with its RPC event loop); exiting with status 0\n";

void ExitQuietly(int) {
  ssize_t ignored = write(STDERR_FILENO, kMessage, sizeof kMessage - 1);
  (void)ignored;
  _exit(0);
}

}  // namespace

extern "C" int ArmTeardownGuard() {
  struct sigaction action = {};
  action.sa_handler = ExitQuietly;
  sigemptyset(&action.sa_mask);
  return sigaction(SIGSEGV, &action, nullptr) != 0 || sigaction(SIGBUS, &action, nullptr) != 0 ? 1 : 0;
}
