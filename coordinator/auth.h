// Bearer tokens for the coordinator's gRPC services and its OpenAI API. With a tokens file
// (--auth-tokens FILE: one "TOKEN ROLE [NAME]" a line) every call must carry
// "authorization: Bearer TOKEN" of an allowed role: `user` for the public API (inference,
// status, expert load, batches), `admin` for all of it, `worker` for the internal Coordinator
// service (registration, heartbeats, the rendezvous store), which is how a worker joins.
// Without a file the coordinator is open, as before (and says so when it starts).
#pragma once

#include <map>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "proto/bearer.h"

namespace gemma::coordinator {

enum class Role { kUser, kAdmin, kWorker };

// Who made a call: the name of its token (the tokens file's NAME, else its role and line) and
// whether it may act on what others own (admin tokens, the coordinator's own calls, and every
// call of an open coordinator, whose name is empty).
struct Principal {
  std::string name;
  bool admin = false;
  // Whether the principal may read or change what `owner` owns.
  bool May(const std::string& owner) const { return admin || owner == name; }
};

class Authenticator {
 public:
  // Open: every call passes.
  Authenticator();
  // INVALID_ARGUMENT naming the line for a malformed file (an unknown role, a short token: at
  // least 16 characters), NOT_FOUND for a missing one.
  static absl::StatusOr<std::unique_ptr<Authenticator>> FromFile(const std::string& path);

  bool enabled() const { return !tokens_.empty(); }
  // A token of the admin role for the coordinator's own in-process calls (its HTTP API and
  // batch runner), never written anywhere.
  const std::string& internal_token() const { return internal_token_; }

  // UNAUTHENTICATED without a bearer token or with an unknown one, PERMISSION_DENIED when its
  // role is not among `allowed` (admin always is); `what` names the call in the message.
  absl::Status Check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                     const std::vector<Role>& allowed, absl::string_view what) const;
  // The same for an HTTP Authorization header's value.
  absl::Status CheckHeader(absl::string_view authorization, const std::vector<Role>& allowed,
                           absl::string_view what) const;
  // Check and CheckHeader, saying who passed.
  absl::StatusOr<Principal> Authenticate(
      const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
      const std::vector<Role>& allowed, absl::string_view what) const;
  absl::StatusOr<Principal> AuthenticateHeader(absl::string_view authorization,
                                               const std::vector<Role>& allowed,
                                               absl::string_view what) const;

 private:
  struct Entry {
    Role role;
    std::string name;
  };
  std::map<std::string, Entry> tokens_;
  std::string internal_token_;
};

using gemma::AddBearer;  // proto/bearer.h

}  // namespace gemma::coordinator
