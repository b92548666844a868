export {
  SwitchboardClient,
  SwitchboardError,
  CloseCode,
  closeAction,
} from "./client.js";
export type {
  SwitchboardClientOptions,
  BackoffOptions,
  WebSocketLike,
  WebSocketConstructor,
  Timers,
  MessageOf,
  LifecycleEvents,
  LifecycleEvent,
  ClientState,
  StopReason,
  CloseAction,
  ClientErrorCode,
} from "./client.js";
export type * from "./events.js";
export { StoryProgressSocket, isStoryProgress } from "./story.js";
export type { StoryProgress, StoryProgressOptions, StoryStatus } from "./story.js";
