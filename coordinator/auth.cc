#include "coordinator/auth.h"

#include <fstream>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace gemma::coordinator {
namespace {

constexpr size_t kMinTokenLength = 16;
constexpr char kHowTo[] =
    "send \"authorization: Bearer TOKEN\" (gemmactl --token or $GEMMA_TOKEN; gemma-worker "
    "--join-token; the OpenAI client's api_key)";

const char* RoleName(Role role) {
  switch (role) {
    case Role::kUser: return "user";
    case Role::kAdmin: return "admin";
    case Role::kWorker: return "worker";
  }
  return "?";
}

std::string RandomToken() {
  std::random_device device;
  std::string out;
  for (int i = 0; i < 4; ++i) {
    absl::StrAppend(&out, absl::StrFormat("%08x", static_cast<uint32_t>(device())));
  }
  return out;
}

}  // namespace

Authenticator::Authenticator() : internal_token_(RandomToken()) {}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the tokens file ", path));
  auto auth = std::make_unique<Authenticator>();
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    const std::string text(absl::StripAsciiWhitespace(line.substr(0, line.find('#'))));
    if (text.empty()) continue;
    std::vector<std::string> fields = absl::StrSplit(text, ' ', absl::SkipWhitespace());
    const std::string where = absl::StrCat(path, " line ", number);
    if (fields.size() < 2 || fields.size() > 3) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": expected \"TOKEN ROLE [NAME]\" (roles: user, admin, worker)"));
    }
    if (fields[0].size() < kMinTokenLength) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": a token must have at least ",
                                                     kMinTokenLength, " characters"));
    }
    Role role;
    if (fields[1] == "user") {
      role = Role::kUser;
    } else if (fields[1] == "admin") {
      role = Role::kAdmin;
    } else if (fields[1] == "worker") {
      role = Role::kWorker;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(where, ": unknown role \"", fields[1],
                                                     "\" (roles: user, admin, worker)"));
    }
    // Unnamed tokens are told apart by their line (each owns its batches and files).
    auth->tokens_[fields[0]] =
        Entry{role, fields.size() == 3 ? fields[2] : absl::StrCat(fields[1], "@line", number)};
  }
  if (auth->tokens_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, " has no token"));
  }
  auth->tokens_[auth->internal_token_] = Entry{Role::kAdmin, "coordinator"};
  return auth;
}

absl::Status Authenticator::CheckHeader(absl::string_view authorization,
                                        const std::vector<Role>& allowed,
                                        absl::string_view what) const {
  return AuthenticateHeader(authorization, allowed, what).status();
}

absl::StatusOr<Principal> Authenticator::AuthenticateHeader(absl::string_view authorization,
                                                            const std::vector<Role>& allowed,
                                                            absl::string_view what) const {
  if (!enabled()) return Principal{"", true};
  authorization = absl::StripAsciiWhitespace(authorization);
  if (authorization.empty()) {
    return absl::UnauthenticatedError(absl::StrCat(what, " needs a bearer token: ", kHowTo));
  }
  if (!absl::StartsWithIgnoreCase(authorization, "bearer ")) {
    return absl::UnauthenticatedError(
        absl::StrCat(what, ": the authorization is not \"Bearer TOKEN\": ", kHowTo));
  }
  const absl::string_view token = absl::StripAsciiWhitespace(authorization.substr(7));
  auto it = tokens_.find(std::string(token));
  if (it == tokens_.end()) {
    return absl::UnauthenticatedError(absl::StrCat(what, ": the bearer token is not known "
                                                   "to this coordinator"));
  }
  const Role role = it->second.role;
  if (role == Role::kAdmin) return Principal{it->second.name, true};
  for (Role r : allowed) {
    if (r == role) return Principal{it->second.name, false};
  }
  std::vector<std::string> names;
  for (Role r : allowed) names.push_back(RoleName(r));
  return absl::PermissionDeniedError(absl::StrCat(
      what, " is not for the ", RoleName(role), " role of token \"", it->second.name,
      "\" (it needs ", names.empty() ? "an admin token" : absl::StrJoin(names, " or ") + " or admin",
      ")"));
}

absl::Status Authenticator::Check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                                  const std::vector<Role>& allowed, absl::string_view what) const {
  return Authenticate(metadata, allowed, what).status();
}

absl::StatusOr<Principal> Authenticator::Authenticate(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
    const std::vector<Role>& allowed, absl::string_view what) const {
  if (!enabled()) return Principal{"", true};
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return AuthenticateHeader("", allowed, what);
  return AuthenticateHeader(absl::string_view(it->second.data(), it->second.size()), allowed,
                            what);
}

}  // namespace gemma::coordinator
